"""The PyTorch reference of the HDCCF loss: SPEC.md as readable code.

It is the test oracle of every other backend and the CPU path. The per-row log-sums over the
negatives (the only part that touches the M × M·P score matrices) are computed here with
masked ``logsumexp``; :mod:`hdccf_triton.terms` turns them into the loss, as for every backend.
Rows are processed in chunks whose score matrices stay below :data:`CHUNK_ELEMENTS` entries,
each chunk under activation checkpointing, so forward and backward at M = 8192, P = 4 fit in
a few GiB.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .interactions import InteractionIndex
from .options import LossOptions
from .terms import NegativeStats, combine_terms, prepare_scores

__all__ = ["per_row_loss", "negative_statistics", "CHUNK_ELEMENTS"]

#: Largest number of entries of one chunk's [rows, M·P] score matrix.
CHUNK_ELEMENTS = 1 << 22


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

    Returns:
        ``[M]`` per-row loss, in float32 for half-precision inputs, else the input dtype.
    """
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

    Returns:
        :class:`~hdccf_triton.terms.NegativeStats`, each field ``[M]``.
    """
    M = U.shape[0]
    N, P, d = X.shape
    X, Y = X.reshape(N * P, d), Y.reshape(N * P, d)
    x_ids, y_ids = pool_items.reshape(-1), pool_users.reshape(-1)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (N * P))
    use_checkpoint = torch.is_grad_enabled() and rows_per_chunk < M

    def chunk(r0, U_c, I_c, X, Y):
        r1 = r0 + U_c.shape[0]
        ids = (users[r0:r1], items[r0:r1], x_ids, y_ids)
        return _chunk_statistics(U_c, I_c, X, Y, *ids, row_offset + r0, P, interactions, options)

    pieces = []
    for r0 in range(0, M, rows_per_chunk):
        args = (U[r0 : r0 + rows_per_chunk], I[r0 : r0 + rows_per_chunk], X, Y)
        if use_checkpoint:  # keep one chunk's [rows, N·P] activations alive, not all of them
            pieces.append(checkpoint(chunk, r0, *args, use_reentrant=False))
        else:
            pieces.append(chunk(r0, *args))
    return NegativeStats(*(torch.cat(parts) for parts in zip(*pieces)))


def _chunk_statistics(U, I, X, Y, users, items, x_ids, y_ids, first_block, P, interactions, options):
    """:func:`negative_statistics` for R rows whose own blocks are ``first_block ..``.

    U, I: ``[R, d]``; X, Y: ``[N·P, d]``; users, items: ``[R]``; x_ids, y_ids: ``[N·P]``.
    """
    R, NP = U.shape[0], X.shape[0]
    inv_tau = 1.0 / options.temperature
    with torch.no_grad():
        blocks = torch.arange(first_block, first_block + R, device=U.device)
        owner = torch.arange(NP, device=U.device) // P
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

    A = U @ X.T * inv_tau  # [R, NP]
    B = I @ Y.T * inv_tau  # [R, NP]  (B[k, j] = f(Y_j, i_k))
    C = U @ Y.T * inv_tau  # [R, NP]
    E = I @ X.T * inv_tau  # [R, NP]
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
