"""noether_wrap: Noether Networks for any PyTorch sequence predictor, in one line."""

from noether_wrap import embeddings
from noether_wrap._affine import Affine
from noether_wrap.conservation import ConservedFit, conservation_loss, fit_conserved
from noether_wrap.loss import noether_loss
from noether_wrap.rollout import Rollout
from noether_wrap.tuning import TuneResult, tune_inner_lr
from noether_wrap.wrapper import NoetherWrapper, TailorOutput

__version__ = "0.1.0"

__all__ = [
    "Affine",
    "ConservedFit",
    "NoetherWrapper",
    "Rollout",
    "TailorOutput",
    "TuneResult",
    "__version__",
    "conservation_loss",
    "embeddings",
    "fit_conserved",
    "noether_loss",
    "tune_inner_lr",
]
