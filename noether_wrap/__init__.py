"""noether_wrap: Noether Networks for any PyTorch sequence predictor, in one line."""

from noether_wrap import embeddings
from noether_wrap.loss import noether_loss
from noether_wrap.rollout import Rollout
from noether_wrap.wrapper import NoetherWrapper, TailorOutput

__version__ = "0.1.0"

__all__ = ["NoetherWrapper", "Rollout", "TailorOutput", "__version__", "embeddings", "noether_loss"]
