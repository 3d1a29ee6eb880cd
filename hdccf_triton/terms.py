"""The backend-independent parts of the loss: the data passed to and from the backends, the
scores that need no M × M·P matrix, and the per-row combination of the terms of
hdccf_triton/LOSS.md from the log-sums over the negatives.

Every backend computes the same :class:`NegativeStats` (the reference with masked
``logsumexp``, the Triton backend in fused kernels) and hands them to :func:`combine_terms`,
so the floor, the ω correction and the M = 1 case are written once.

How it stays exact and finite: every sum of exponentials arrives as its logarithm (−inf when
empty) and the terms are combined in log space, so scores of ±500 neither overflow nor vanish.
The debiased negative score F = max(a − b, floor) is ``log(a − b) = log a + log(1 − b/a)``
where it does not bind and the constant ``log floor`` where it does (zero gradient), chosen by
a mask computed first, and each branch of a ``where`` is fed inputs that are finite in it, so
no NaN can reach a gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .options import LossOptions

__all__ = ["ExtraNegatives", "LossInputs", "Scores", "NegativeStats", "reduce_similarity", "prepare_scores",
           "column_log_q", "combine_terms"]

_LN2 = math.log(2.0)


class ExtraNegatives(NamedTuple):
    """The mixed negatives of a batch (hdccf_triton/LOSS.md, "Mixed negatives"): B′ items and
    B′ users shared by every row, extra negatives of the user–item term.

    Shapes: item_emb, user_emb ``[B′, d]`` (laid out as the pools' rows: ``[q ‖ e]`` and
    ``[p ‖ e]`` for a ModulatedSimilarity); items, users ``[B′]`` integer ids.
    """

    item_emb: torch.Tensor
    user_emb: torch.Tensor
    items: torch.Tensor
    users: torch.Tensor

    def with_embeddings(self, item_emb, user_emb) -> "ExtraNegatives":
        """These extra negatives with other embeddings (same ids)."""
        return ExtraNegatives(item_emb, user_emb, self.items, self.users)


class LossInputs(NamedTuple):
    """The tensors of the loss, validated; ids int64. Every backend takes them as one
    argument.

    Shapes: user_emb, item_emb ``[M, d]``; pool_item_emb, pool_user_emb ``[N, P, d]``;
    users, items ``[M]``; pool_items, pool_users ``[N, P]``. N = M in one process; under
    ``gather_across_ranks`` the pools are those of all ranks and row k's own block is pool
    block ``row_offset + k`` (hdccf_triton/LOSS.md, "Batch"). Optional: ``extra``, the mixed
    negatives (:class:`ExtraNegatives`, never gathered across ranks), and ``log_q``, the
    sampling corrections ``(item table [num_items] or None, user table [num_users] or None)``
    (hdccf_triton/LOSS.md, "Sampling-bias correction").
    """

    user_emb: torch.Tensor
    item_emb: torch.Tensor
    pool_item_emb: torch.Tensor
    pool_user_emb: torch.Tensor
    users: torch.Tensor
    items: torch.Tensor
    pool_items: torch.Tensor
    pool_users: torch.Tensor
    extra: ExtraNegatives | None = None
    log_q: tuple | None = None

    @property
    def embeddings(self) -> tuple:
        """(user_emb, item_emb, pool_item_emb, pool_user_emb)."""
        return self[:4]

    @property
    def ids(self) -> tuple:
        """(users, items, pool_items, pool_users)."""
        return self[4:8]

    @property
    def num_extra(self) -> int:
        """B′, the number of mixed negatives of each kind (0 without)."""
        return 0 if self.extra is None else int(self.extra.items.shape[0])

    def with_embeddings(self, user_emb, item_emb, pool_item_emb, pool_user_emb,
                        extra: ExtraNegatives | None = None) -> "LossInputs":
        """These inputs with other embeddings (same ids; ``extra``: the mixed negatives with
        other embeddings, else these)."""
        return LossInputs(user_emb, item_emb, pool_item_emb, pool_user_emb, *self.ids,
                          extra if extra is not None else self.extra, self.log_q)


class Scores(NamedTuple):
    """Embeddings as the similarity sees them, and the scores of each row's own block.

    U, I: ``[M, d]``; X, Y: ``[N, P, d]`` pools of N ≥ M blocks (N = M in one process; the
    pools of all ranks under ``torch.distributed``): from :func:`prepare_scores` normalised for
    cosine and at least float32 (for a ModulatedSimilarity: the ``[.., 2·dim]`` inputs
    ``[p ‖ e]``, cast, not normalised); the Triton backend passes them as its kernels read
    them (raw, in the kernels' dtype). :func:`combine_terms` reads only their shapes;
    s: ``[M]`` positive scores s_k; own_A, own_B, own_C, own_E: ``[M, P]`` the own-block
    columns of A, B, C, E (already divided by τ).
    """

    U: torch.Tensor
    I: torch.Tensor
    X: torch.Tensor
    Y: torch.Tensor
    s: torch.Tensor
    own_A: torch.Tensor
    own_B: torch.Tensor
    own_C: torch.Tensor
    own_E: torch.Tensor
    extra: ExtraNegatives | None = None


class NegativeStats(NamedTuple):
    """Per-row statistics over the negative columns, each ``[M]``.

    lse_A, lse_E: log Σ e^score over the true negative items Tᴵ_k (all negatives when
    ``debias`` is False); lse_B, lse_C: the same over Tᵁ_k; −inf where the set is empty.
    With mixed negatives, A and B sum over the pool and the extra columns, C and E over the pool
    columns only (hdccf_triton/LOSS.md, "Mixed negatives"). With a sampling correction every
    exponent is the corrected score (score − ℓ of the column).
    n_item, n_user: int64 |Tᴵ_k| and |Tᵁ_k| (user–item term: extra columns included);
    n_item_aux, n_user_aux: the same over the pool columns only (the auxiliary terms), or None
    when there are no extra columns (then equal to n_item, n_user).
    """

    lse_A: torch.Tensor
    lse_B: torch.Tensor
    lse_C: torch.Tensor
    lse_E: torch.Tensor
    n_item: torch.Tensor
    n_user: torch.Tensor
    n_item_aux: torch.Tensor | None = None
    n_user_aux: torch.Tensor | None = None


def reduce_similarity(inputs: LossInputs, options: LossOptions) -> tuple[LossInputs, LossOptions]:
    """The inputs and options with the simplest equal similarity (:meth:`Similarity.reduce`):
    the all-ones modulation becomes ``Dot()`` (``Cosine()``) of the embedding halves, so that
    it runs the dot kernels and code, equal to the bit. Other similarities pass unchanged."""
    extra = () if inputs.extra is None else tuple(inputs.extra[:2])
    similarity, embeddings = options.similarity.reduce(tuple(inputs.embeddings) + extra)
    if similarity is options.similarity:
        return inputs, options
    reduced_extra = inputs.extra.with_embeddings(*embeddings[4:]) if extra else None
    return inputs.with_embeddings(*embeddings[:4], extra=reduced_extra), options.with_similarity(similarity)


def prepare_scores(inputs: LossInputs, options: LossOptions, row_offset: int = 0) -> Scores:
    """Cast to at least float32 and score the diagonal and the own blocks (normalised for a
    cosine) with ``options.similarity`` (already reduced, :func:`reduce_similarity`).

    Args:
        inputs: the embeddings ``[M, d]`` and pools ``[N, P, d]`` (``d = 2·dim``,
            ``[p ‖ e]`` / ``[q ‖ e]``, for a ModulatedSimilarity); ids are not read.
        row_offset: row k's own block is pool block ``row_offset + k``.
    """
    dtype = torch.promote_types(inputs.user_emb.dtype, torch.float32)
    U, I, X, Y = (t.to(dtype) for t in inputs.embeddings)
    extra = inputs.extra
    if extra is not None:  # the mixed negatives as the pools are scored (cast; normalised for a cosine)
        extra = extra.with_embeddings(*(options.similarity.prepared(t.to(dtype)) for t in extra[:2]))
    return Scores(*options.similarity.own_scores(U, I, X, Y, 1.0 / options.temperature, row_offset), extra)


def column_log_q(inputs: LossInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sampling correction ℓ of every negative column (hdccf_triton/LOSS.md,
    "Sampling-bias correction"): ``(ℓᴵ [C], ℓᵁ [C])`` in ``dtype``, C = N·P + B′ (the pool
    columns, then the extra ones), gathered from the tables of ``inputs.log_q`` by the
    columns' ids (zeros for a missing table); None without a correction."""
    if inputs.log_q is None:
        return None
    pool_items, pool_users = inputs.ids[2:]
    x_ids, y_ids = pool_items.reshape(-1), pool_users.reshape(-1)
    if inputs.extra is not None:
        x_ids, y_ids = torch.cat([x_ids, inputs.extra.items]), torch.cat([y_ids, inputs.extra.users])
    out = []
    for table, ids in zip(inputs.log_q, (x_ids, y_ids)):
        if table is None:
            out.append(torch.zeros(ids.shape[0], dtype=dtype, device=ids.device))
        else:
            out.append(table.detach().to(dtype).index_select(0, ids))
    return tuple(out)


def combine_terms(scores: Scores, stats: NegativeStats, options: LossOptions) -> torch.Tensor:
    """loss[k] = L_ui[k] + λ_u·L_uu[k] + λ_i·L_ii[k] (hdccf_triton/LOSS.md, "Total"), ``[M]``."""
    s = scores.s
    N, P = scores.X.shape[:2]
    Q_aux = P * (N - 1)  # negatives per row: every pool column outside the row's own block
    Q = Q_aux + (0 if scores.extra is None else scores.extra.items.shape[0])  # and the mixed negatives
    n_user_aux = stats.n_user if stats.n_user_aux is None else stats.n_user_aux
    n_item_aux = stats.n_item if stats.n_item_aux is None else stats.n_item_aux
    if options.debias:
        log_floor = (math.log(Q) if Q > 0 else -math.inf) - 1.0 / options.temperature
        log_FU = _debiased_log_negative_score(
            s, stats.lse_B, stats.n_user, scores.own_B, options.omega_user, Q, log_floor
        )
        log_FI = _debiased_log_negative_score(
            s, stats.lse_A, stats.n_item, scores.own_A, options.omega_item, Q, log_floor
        )
        log_Q_aux = math.log(Q_aux) if Q_aux > 0 else -math.inf
        log_GU = log_Q_aux - torch.log(n_user_aux.clamp(min=1).to(s.dtype)) + stats.lse_C
        log_GI = log_Q_aux - torch.log(n_item_aux.clamp(min=1).to(s.dtype)) + stats.lse_E
    else:
        log_FU, log_FI, log_GU, log_GI = stats.lse_B, stats.lse_A, stats.lse_C, stats.lse_E

    # L_ui = −s + log(e^s + Fᵁ + Fᴵ)
    loss_ui = torch.logsumexp(torch.stack([s, log_FU, log_FI]), dim=0) - s
    # L_uu = Σ_own −C + log(e^C + Gᵁ) = Σ_own log(1 + Gᵁ·e^{−C}); L_ii likewise
    zeros = torch.zeros_like(scores.own_C)
    loss_uu = torch.logaddexp(zeros, log_GU[:, None] - scores.own_C).sum(-1)
    loss_ii = torch.logaddexp(zeros, log_GI[:, None] - scores.own_E).sum(-1)
    return loss_ui + options.lambda_user * loss_uu + options.lambda_item * loss_ii


def _debiased_log_negative_score(s, lse_true, n_true, own, omega, Q, log_floor):
    """log Fᵁ (or log Fᴵ) of hdccf_triton/LOSS.md (eqs. 14-16) for every row.

        a = Q / ((1−ω)·n) · Σ_{true negatives} e^score            (0 when n = 0)
        b = Q·ω / ((1−ω)·(P+1)) · (e^s + Σ_{own block} e^score)
        F = max(a − b, Q·e^{−1/τ})

    Args:
        s: ``[M]`` positive scores; lse_true: ``[M]`` log Σ over true negatives (−inf if none);
        n_true: ``[M]`` number of true negatives; own: ``[M, P]`` own-block scores.
    """
    if Q == 0:  # N = 1: no negatives, F = 0 (the floor Q·e^{−1/τ} is 0 too)
        return torch.full_like(s, -math.inf)
    P = own.shape[1]
    log_coef_a = math.log(Q) - math.log1p(-omega) - torch.log(n_true.clamp(min=1).to(s.dtype))
    log_a = log_coef_a + lse_true  # −inf when n = 0
    if omega > 0:
        log_coef_b = math.log(Q * omega) - math.log1p(-omega) - math.log(P + 1)
        log_b = log_coef_b + torch.logaddexp(s, torch.logsumexp(own, dim=-1))
    else:
        log_b = torch.full_like(s, -math.inf)
    floor = torch.full_like(s, log_floor)
    with torch.no_grad():
        binds = log_a <= torch.logaddexp(log_b, floor)
    safe_a = torch.where(binds, torch.zeros_like(log_a), log_a)
    safe_b = torch.where(binds, torch.full_like(log_b, -math.inf), log_b)
    return torch.where(binds, floor, safe_a + _log1mexp(safe_b - safe_a))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0 (and x = −inf), accurately on both sides of −ln 2."""
    near_zero = x > -_LN2
    x_near = torch.where(near_zero, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near_zero, torch.full_like(x, -_LN2), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))
