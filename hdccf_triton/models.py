"""The embedding model that the examples train, and the objectives compared in them.

One model (user and item tables, a similarity) serves every objective:

* :class:`HDCCFObjective`: the HDCCF loss over the in-batch pools of a sampler batch; with
  ``debias=False, lambda_user=lambda_item=0`` it is the plain in-batch softmax baseline;
* :class:`BPRObjective`: the pairwise BPR loss, −log σ(f(u, i) − f(u, j)), with one negative
  item per observed pair drawn uniformly among the items the user did not interact with.

The model exposes ``score(users [B], items [B, C])`` and ``score_all(users [B])`` for
:class:`~hdccf_triton.metrics.Evaluator`, plus an optional per-item prior added to every
score at inference (:meth:`EmbeddingModel.set_item_prior`, :func:`log_frequency_prior`).

Why a prior: the in-batch negatives of the HDCCF sampler are drawn in proportion to item
frequency (Proposition 1 of the paper), and a softmax over negatives drawn from q learns
logits f(u, i)/τ ≈ log p(i | u) − log q(i) + c_u (the sampling bias of sampled softmax): the
scores rank items by how much more than their popularity the user likes them. Adding
τ·log q(i) back at inference (the logQ correction, applied at scoring time) ranks by
p(i | u) again. BPR's uniform negatives need no such prior.

τ is the theory's strength; how much of log q(i) to add back is a ranking choice that
:func:`select_prior_strength` makes on a validation split (a grid of α in α·log q(i)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .interactions import InteractionIndex
from .loss import DebiasedContrastiveLoss
from .terms import ExtraNegatives
from .similarity import Similarity, as_similarity

__all__ = ["EmbeddingModel", "HDCCFObjective", "BPRObjective", "best_strength", "log_frequency_prior",
           "scan_prior_strengths", "select_prior_strength"]


class EmbeddingModel(nn.Module):
    """User and item embedding tables with a similarity f.

    Args:
        num_users, num_items: table sizes.
        dim: d. With a :class:`ModulatedSimilarity` each row holds ``2·d`` entries
            ``[embedding ‖ modulation factor]`` and the similarity's ``dim`` must be d.
        similarity: a :class:`~hdccf_triton.similarity.Similarity`, ``"dot"`` or ``"cosine"``
            (registered as a submodule, so a ModulatedSimilarity's parameters train with the
            tables).
        init_std: standard deviation of the normal initialisation of the tables.

    Buffers:
        item_prior: ``[num_items]``, added to every score of :meth:`score` and
            :meth:`score_all` (zeros unless :meth:`set_item_prior` sets it; saved in the
            state dict). Training never reads it.
    """

    def __init__(self, num_users: int, num_items: int, dim: int, similarity: "Similarity | str" = "dot",
                 init_std: float = 0.1):
        super().__init__()
        self.similarity = as_similarity(similarity)
        width = self.similarity.width(dim)
        self.dim = dim
        self.user_table = nn.Embedding(num_users, width)
        self.item_table = nn.Embedding(num_items, width)
        nn.init.normal_(self.user_table.weight, std=init_std)
        nn.init.normal_(self.item_table.weight, std=init_std)
        self.register_buffer("item_prior", torch.zeros(num_items))

    def set_item_prior(self, prior: torch.Tensor | None) -> None:
        """Add ``prior [num_items]`` to the inference scores (None: no prior)."""
        if prior is None:
            self.item_prior.zero_()
            return
        if not isinstance(prior, torch.Tensor) or prior.shape != self.item_prior.shape:
            raise ValueError(f"prior: expected a tensor of shape {tuple(self.item_prior.shape)}, "
                             f"got {getattr(prior, 'shape', type(prior).__name__)}")
        if not torch.isfinite(prior).all():
            raise ValueError("prior: expected finite values")
        self.item_prior.copy_(prior)

    @property
    def num_items(self) -> int:
        return self.item_table.num_embeddings

    def pair_scores(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """f for broadcasting ``[..., width]`` user and item rows → ``[...]``."""
        return self.similarity.pair_scores(user_emb, item_emb)

    @torch.no_grad()
    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``users [B]``, ``items [B, C]`` → ``[B, C]`` scores f(u, i) + prior(i)."""
        return self.pair_scores(self.user_table(users)[:, None, :], self.item_table(items)) + self.item_prior[items]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """``users [B]`` → ``[B, num_items]`` scores f(u, i) + prior(i) against every item."""
        return self.similarity.score_matrix(self.user_table(users), self.item_table.weight) + self.item_prior


def log_frequency_prior(train_items: torch.Tensor, num_items: int, temperature: float) -> torch.Tensor:
    """τ·log(frequency) of each item in the training pairs (frequency ≥ 1), ``[num_items]`` float32.

    The prior that restores p(i | u) ranking for a model trained with in-batch negatives at
    temperature τ (see the module docstring); the constant log of the total cancels in ranking.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    counts = torch.bincount(train_items.reshape(-1).cpu(), minlength=num_items)[:num_items]
    return temperature * torch.log(counts.clamp(min=1).to(torch.float32))


@torch.no_grad()
def select_prior_strength(model: EmbeddingModel, evaluator, log_counts: torch.Tensor, strengths, *,
                          split: str = "valid", protocol: str | None = None, metric: str | None = None,
                          ks=(10, 50)) -> tuple[float, dict[float, float]]:
    """Choose α of the prior α·log_counts on a validation split, and leave it set on the model.

    The model's scores are computed once (its own prior set to zero meanwhile); every α is
    evaluated on them (:meth:`~hdccf_triton.metrics.Evaluator.evaluate` with ``item_offsets``),
    so the scan costs about one evaluation.

    Args:
        model: the model; its prior is overwritten.
        evaluator: a :class:`~hdccf_triton.metrics.Evaluator`.
        log_counts: ``[num_items]`` log item frequencies, e.g. ``log_frequency_prior(items, n, 1.0)``.
        strengths: the candidate α (at least one, finite).
        split, protocol, metric: what is maximised (never the test split); None: the
            evaluator's :attr:`~hdccf_triton.metrics.Evaluator.selection`.
        ks: cut-offs evaluated (the metric's K among them).

    Returns:
        (the best α, {α: its metric}); ties go to the first candidate.
    """
    scan = scan_prior_strengths(model, evaluator, log_counts, strengths, split=split,
                                protocols=None if protocol is None else (protocol,), ks=ks)
    protocol, metric = protocol or evaluator.selection[0], metric or evaluator.selection[1]
    values = {a: r[protocol][metric] for a, r in scan.items()}
    best = best_strength(values)
    model.set_item_prior(best * log_counts)
    return best, values


def best_strength(values: dict[float, float]) -> float:
    """The α of the highest value in ``{α: metric}``; ties go to the first."""
    order = list(values)
    return max(values, key=lambda a: (values[a], -order.index(a)))


@torch.no_grad()
def scan_prior_strengths(model: EmbeddingModel, evaluator, log_counts: torch.Tensor, strengths, *,
                         split: str = "valid", protocols=None, ks=(10, 50)) -> dict[float, dict]:
    """Every metric of ``split`` at each prior α·log_counts, the model scored once.

    Returns ``{α: evaluator results}`` in the order of ``strengths``; the model's prior is
    zero afterwards.
    """
    strengths = [float(a) for a in strengths]
    if not strengths or not all(math.isfinite(a) for a in strengths):
        raise ValueError(f"strengths: expected at least one finite value, got {strengths!r}")
    if split == "test":
        raise ValueError("split: the prior strength must be chosen on a validation split, not 'test'")
    model.set_item_prior(None)
    offsets = {a: a * log_counts.to(model.item_prior) for a in dict.fromkeys(strengths)}
    return evaluator.evaluate(model, split, ks=ks, protocols=protocols, item_offsets=offsets)


class HDCCFObjective(nn.Module):
    """The HDCCF loss of a sampler batch for an :class:`EmbeddingModel`.

    Args:
        model: the embedding model (its similarity is the loss's).
        interactions: the training pairs (false negatives), or None.
        **options: the loss's keyword options (temperature, omega_user, ..., backend, and the
            sampling corrections ``item_log_q``, ``user_log_q``:
            :meth:`~hdccf_triton.InBatchSampler.sampling_log_q`).
    """

    def __init__(self, model: EmbeddingModel, interactions: InteractionIndex | None, **options):
        super().__init__()
        self.model = model
        self.loss_fn = DebiasedContrastiveLoss(interactions, similarity=model.similarity, **options)

    def forward(self, batch) -> torch.Tensor:
        """``batch``: (users [M], items [M], pool_items [M, P], pool_users [M, P]) and, when the
        sampler draws mixed negatives, (extra_items [B′], extra_users [B′])."""
        users, items, pool_items, pool_users = batch[:4]
        extra_items, extra_users = (batch[4], batch[5]) if len(batch) > 4 else (None, None)
        M, P = pool_items.shape
        MP = M + M * P
        # one lookup per table: each lookup's backward zeroes a dense [rows, width] gradient, which
        # costs more than the loss on a large catalogue (Gowalla: 41k items)
        user_ids, item_ids = [users, pool_users.reshape(-1)], [items, pool_items.reshape(-1)]
        if extra_items is not None:
            user_ids.append(extra_users)
            item_ids.append(extra_items)
        user_rows = self.model.user_table(torch.cat(user_ids))
        item_rows = self.model.item_table(torch.cat(item_ids))
        extra = None
        if extra_items is not None:
            extra = ExtraNegatives(item_rows[MP:], user_rows[MP:], extra_items, extra_users)
        return self.loss_fn(
            user_rows[:M], item_rows[:M], item_rows[M:MP].view(M, P, -1), user_rows[M:MP].view(M, P, -1),
            users, items, pool_items, pool_users, extra_negatives=extra,
        )


class BPRObjective(nn.Module):
    """BPR: mean of −log σ(f(u, i) − f(u, j)) over the batch's observed pairs (u, i).

    j is drawn uniformly among the items u did not interact with in training (rejection:
    a redraw for the few draws that hit a training item, a bounded number of times).

    Args:
        model: the embedding model.
        interactions: the training pairs, used to reject observed negatives.
        seed: seed of the negative draws.
    """

    def __init__(self, model: EmbeddingModel, interactions: InteractionIndex, seed: int = 0, redraws: int = 10):
        super().__init__()
        self.model = model
        self.interactions = interactions
        self.redraws = redraws
        self.generator = torch.Generator(device=interactions.device).manual_seed(seed)

    def sample_negatives(self, users: torch.Tensor) -> torch.Tensor:
        """``users [M]`` → ``[M]`` items, uniformly among those each user did not interact with."""
        index = self.interactions
        draw = lambda n: torch.randint(0, index.num_items, (n,), generator=self.generator, device=index.device)  # noqa: E731
        negatives = draw(users.numel())
        for _ in range(self.redraws):
            hit = index.contains(users, negatives)
            if not hit.any():
                break
            negatives[hit] = draw(int(hit.sum()))
        return negatives

    def forward(self, batch) -> torch.Tensor:
        users, items = batch[0], batch[1]
        negatives = self.sample_negatives(users.to(self.interactions.device)).to(users.device)
        m = self.model
        u = m.user_table(users)
        both = m.item_table(torch.cat([items, negatives]))  # one lookup: one dense gradient
        pos = m.pair_scores(u, both[: users.numel()])
        neg = m.pair_scores(u, both[users.numel():])
        return F.softplus(neg - pos).mean()  # −log σ(pos − neg)
