"""The PyTorch reference of the HDCCF loss: SPEC.md as readable code.

It is the test oracle of every other backend and the CPU path. The per-row log-sums over the
negatives (the only part that touches the M × M·P score matrices) are computed here with
masked ``logsumexp``; :mod:`hdccf_triton.terms` turns them into the loss, as for every backend.
Rows are processed in chunks whose score matrices stay below :data:`CHUNK_ELEMENTS` entries,
each chunk under activation checkpointing, so forward and backward at M = 8192, P = 4 fit in
a few GiB. With a :class:`~hdccf_triton.ModulatedSimilarity` the modulation of every
(row, column) pair is an [rows, M·P, dim] tensor: chunks are then bounded by
:data:`MODULATED_CHUNK_ELEMENTS` entries of it, and the per-entity parts of eq. 8 (W₁e_i,
W₂e_u) are products of the un-broadcast operands, so only W₃(e_i⊙e_u) is pairwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .interactions import InteractionIndex
from .options import LossOptions
from .similarity import modulated_scores
from .terms import NegativeStats, combine_terms, prepare_scores, resolve_similarity

__all__ = ["per_row_loss", "negative_statistics", "CHUNK_ELEMENTS", "MODULATED_CHUNK_ELEMENTS"]

#: Largest number of entries of one chunk's [rows, M·P] score matrix.
CHUNK_ELEMENTS = 1 << 22
#: Largest number of entries of one chunk's [rows, M·P, dim] pairwise modulation tensor
#: (a ModulatedSimilarity); the backward of a chunk keeps about ten of them.
MODULATED_CHUNK_ELEMENTS = 1 << 21


def per_row_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    pool_item_emb: torch.Tensor,
    pool_user_emb: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    pool_items: torch.Tensor,
    pool_users: torch.Tensor,
    interactions: InteractionIndex | None,
    options: LossOptions,
    row_offset: int = 0,
) -> torch.Tensor:
    """loss[k] of SPEC.md for every row (inputs already validated).

    Args:
        user_emb, item_emb: ``[M, d]`` embeddings of u_k and i_k.
        pool_item_emb, pool_user_emb: ``[N, P, d]`` embeddings of the pools (N = M, except
            under ``torch.distributed`` where they are the pools of all ranks).
        users, items: ``[M]`` int64 ids; pool_items, pool_users: ``[N, P]`` int64 ids.
        interactions: the training pairs D, or None (only identity false negatives).
        options: the validated options.
        row_offset: row k's own block is pool block ``row_offset + k``.

        With a ModulatedSimilarity ``options.similarity``, d = 2·dim: users ``[p ‖ e]``,
        items ``[q ‖ e]``.

    Returns:
        ``[M]`` per-row loss, in float32 for half-precision inputs, else the input dtype.
    """
    user_emb, item_emb, pool_item_emb, pool_user_emb, options = resolve_similarity(
        user_emb, item_emb, pool_item_emb, pool_user_emb, options
    )
    scores = prepare_scores(user_emb, item_emb, pool_item_emb, pool_user_emb, options, row_offset)
    stats = negative_statistics(
        scores.U, scores.I, scores.X, scores.Y, users, items, pool_items, pool_users,
        interactions, options, row_offset=row_offset,
    )
    return combine_terms(scores, stats, options)


def negative_statistics(
    U, I, X, Y, users, items, pool_items, pool_users, interactions, options, row_offset: int = 0
) -> NegativeStats:
    """Per-row log-sums over the (true) negatives and their counts, chunked over rows.

    Args:
        U, I: ``[M, d]``; X, Y: ``[N, P, d]`` pools; users, items: ``[M]``;
        pool_items, pool_users: ``[N, P]``; row k's own block is pool block ``row_offset + k``.
            For a ModulatedSimilarity (``options.modulation``), d = 2·dim: ``[p ‖ e]`` for
            users, ``[q ‖ e]`` for items, as :func:`~hdccf_triton.terms.prepare_scores` keeps them.

    Returns:
        :class:`~hdccf_triton.terms.NegativeStats`, each field ``[M]``.
    """
    M = U.shape[0]
    N, P, d = X.shape
    X, Y = X.reshape(N * P, d), Y.reshape(N * P, d)
    x_ids, y_ids = pool_items.reshape(-1), pool_users.reshape(-1)
    sim = options.modulation
    if sim is None:
        rows, cols, scorer = (U, I), (X, Y), _dot_scores
        # one chunk holds a few [rows, N·P] score matrices
        rows_per_chunk = max(1, CHUNK_ELEMENTS // (N * P))
    else:
        rows, cols, scorer = _modulated_operands(U, I, X, Y, sim)
        # one chunk holds a few [rows, N·P, dim] modulation tensors
        rows_per_chunk = max(1, MODULATED_CHUNK_ELEMENTS // (N * P * sim.dim))
    use_checkpoint = torch.is_grad_enabled() and rows_per_chunk < M

    def chunk(r0, *tensors):
        rows_c, cols_c = tensors[: len(rows)], tensors[len(rows) :]
        r1 = r0 + rows_c[0].shape[0]
        ids = (users[r0:r1], items[r0:r1], x_ids, y_ids)
        A, B, C, E = scorer(rows_c, cols_c, options)
        return _chunk_statistics(A, B, C, E, *ids, row_offset + r0, P, interactions, options)

    pieces = []
    for r0 in range(0, M, rows_per_chunk):
        args = (*(t[r0 : r0 + rows_per_chunk] for t in rows), *cols)
        if use_checkpoint:  # keep one chunk's activations alive, not all of them
            pieces.append(checkpoint(chunk, r0, *args, use_reentrant=False))
        else:
            pieces.append(chunk(r0, *args))
    return NegativeStats(*(torch.cat(parts) for parts in zip(*pieces)))


def _dot_scores(rows, cols, options):
    """A, B, C, E ``[R, N·P]`` of the dot product of (cosine-normalised) embeddings."""
    (U, I), (X, Y) = rows, cols
    inv_tau = 1.0 / options.temperature
    A = U @ X.T * inv_tau  # [R, NP]
    B = I @ Y.T * inv_tau  # [R, NP]  (B[k, j] = f(Y_j, i_k))
    C = U @ Y.T * inv_tau  # [R, NP]
    E = I @ X.T * inv_tau  # [R, NP]
    return A, B, C, E


def _modulated_operands(U, I, X, Y, sim):
    """Row and column operands of :func:`_modulated_scores`: the p/q halves, the factors
    e, and the p/q halves as f_uu and f_ii see them (normalised with ``sim.normalize``)."""
    (p_u, e_u), (q_i, e_i), (q_x, e_x), (p_y, e_y) = (sim.split(t) for t in (U, I, X, Y))
    c_u, c_i, c_x, c_y = p_u, q_i, q_x, p_y
    if sim.normalize:
        c_u, c_i, c_x, c_y = (F.normalize(t, dim=-1, eps=1e-12) for t in (c_u, c_i, c_x, c_y))
    parts = sim.parts(U.dtype)

    def scorer(rows, cols, options):
        return _modulated_scores(rows, cols, parts, sim.normalize, options)

    return (p_u, e_u, q_i, e_i, c_u, c_i), (q_x, e_x, p_y, e_y, c_x, c_y), scorer


def _modulated_scores(rows, cols, parts, normalize, options):
    """A, B (eqs. 7-8, pairwise modulation) and C, E (dot of p, of q), each ``[R, N·P]``.

    The modulation of the R × N·P pairs is an [R, N·P, dim] tensor: the chunk size bounds it.
    """
    (p_u, e_u, q_i, e_i, c_u, c_i), (q_x, e_x, p_y, e_y, c_x, c_y) = rows, cols
    inv_tau = 1.0 / options.temperature
    r, c = (lambda t: t[:, None, :]), (lambda t: t[None, :, :])  # noqa: E731
    A = modulated_scores(parts, r(p_u), r(e_u), c(q_x), c(e_x), normalize) * inv_tau  # f(u_k, X_j)
    B = modulated_scores(parts, c(p_y), c(e_y), r(q_i), r(e_i), normalize) * inv_tau  # f(Y_j, i_k)
    C = c_u @ c_y.T * inv_tau  # f_uu(u_k, Y_j)
    E = c_i @ c_x.T * inv_tau  # f_ii(i_k, X_j)
    return A, B, C, E


def _chunk_statistics(A, B, C, E, users, items, x_ids, y_ids, first_block, P, interactions, options):
    """:func:`negative_statistics` for R rows whose own blocks are ``first_block ..``.

    A, B, C, E: ``[R, N·P]`` scores; users, items: ``[R]``; x_ids, y_ids: ``[N·P]``.
    """
    R, NP = A.shape
    with torch.no_grad():
        blocks = torch.arange(first_block, first_block + R, device=A.device)
        owner = torch.arange(NP, device=A.device) // P
        negative = owner[None, :] != blocks[:, None]  # [R, NP]
        if options.debias:
            item_fn = x_ids[None, :] == items[:, None]  # φᴵ: X_j is i_k, or (u_k, X_j) ∈ D
            user_fn = y_ids[None, :] == users[:, None]  # φᵁ: Y_j is u_k, or (Y_j, i_k) ∈ D
            if interactions is not None:
                item_fn |= interactions.contains(users[:, None], x_ids[None, :])
                user_fn |= interactions.contains(y_ids[None, :], items[:, None])
            true_item = negative & ~item_fn  # Tᴵ
            true_user = negative & ~user_fn  # Tᵁ
        else:
            true_item = true_user = negative
        n_item = true_item.sum(-1)
        n_user = true_user.sum(-1)

    return (
        _masked_logsumexp(A, true_item),
        _masked_logsumexp(B, true_user),
        _masked_logsumexp(C, true_user),
        _masked_logsumexp(E, true_item),
        n_item,
        n_user,
    )


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Σ_{mask} eˣ over the last dim; −inf (with zero gradient) where the mask is empty."""
    return torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=-1)
