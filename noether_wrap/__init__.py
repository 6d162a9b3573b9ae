"""noether_wrap: Noether Networks for any PyTorch sequence predictor, in one line."""

from noether_wrap import embeddings, validation
from noether_wrap._inner import Affine
from noether_wrap.conservation import (
    ConservedFit,
    conservation_loss,
    denoise_with_labels,
    drift_loss,
    fit_conserved,
)
from noether_wrap.diagnostics import Diagnosis, diagnose
from noether_wrap.loss import noether_loss
from noether_wrap.rollout import Rollout
from noether_wrap.tuning import (
    TailoringDoesNotHelp,
    TuneConfig,
    TuneGridResult,
    TuneResult,
    TuningWarning,
    tune,
    tune_cv,
    tune_inner_lr,
)
from noether_wrap.wrapper import NoetherWrapper, TailorOutput

__version__ = "0.1.0"

__all__ = [
    "Affine",
    "ConservedFit",
    "Diagnosis",
    "NoetherWrapper",
    "Rollout",
    "TailorOutput",
    "TailoringDoesNotHelp",
    "TuneConfig",
    "TuneGridResult",
    "TuneResult",
    "TuningWarning",
    "__version__",
    "conservation_loss",
    "denoise_with_labels",
    "diagnose",
    "drift_loss",
    "embeddings",
    "fit_conserved",
    "noether_loss",
    "tune",
    "tune_cv",
    "tune_inner_lr",
    "validation",
]
