"""hdccf-triton: the HDCCF debiased contrastive loss for collaborative filtering (IJCAI 2022).

Importing this package needs torch and numpy only; Triton, polars, tqdm and matplotlib are
imported where they are used.
"""

from .interactions import InteractionIndex
from .loss import BackendUnavailableError, DebiasedContrastiveLoss, debiased_contrastive_loss
from .options import LossOptions
from .similarity import ModulatedSimilarity

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DebiasedContrastiveLoss",
    "InteractionIndex",
    "LossOptions",
    "ModulatedSimilarity",
    "debiased_contrastive_loss",
]
