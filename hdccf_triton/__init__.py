"""hdccf-triton: the HDCCF debiased contrastive loss for collaborative filtering (IJCAI 2022).

Importing this package needs torch and numpy only; Triton, polars, tqdm and matplotlib are
imported where they are used.
"""

from .data import Dataset, DownloadError, load_dataset
from .interactions import InteractionIndex
from .loss import BackendUnavailableError, DebiasedContrastiveLoss, debiased_contrastive_loss
from .metrics import Evaluator, format_results
from .models import BPRObjective, EmbeddingModel, HDCCFObjective, log_frequency_prior, select_prior_strength
from .options import LossOptions
from .sampling import Batch, InBatchSampler, MixedBatch
from .similarity import Cosine, Dot, ModulatedSimilarity, Similarity
from .terms import ExtraNegatives

__version__ = "0.1.0"

__all__ = [
    "BPRObjective",
    "BackendUnavailableError",
    "Batch",
    "Cosine",
    "Dataset",
    "DebiasedContrastiveLoss",
    "Dot",
    "DownloadError",
    "EmbeddingModel",
    "ExtraNegatives",
    "Evaluator",
    "HDCCFObjective",
    "InBatchSampler",
    "InteractionIndex",
    "LossOptions",
    "MixedBatch",
    "ModulatedSimilarity",
    "Similarity",
    "debiased_contrastive_loss",
    "format_results",
    "load_dataset",
    "log_frequency_prior",
    "select_prior_strength",
]
