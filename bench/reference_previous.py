"""The PyTorch reference as it was before the CPU speed-up (commit 1dc928b), kept so that the
benchmarks time the previous and the current implementation in one process
(``bench/reference_large.py``, ``bench/train_step_cpu.py``). Not used by the library.

The PyTorch reference of the HDCCF loss: hdccf_triton/LOSS.md as readable code.

It is the test oracle of every other backend and the CPU path. The per-row log-sums over the
negatives (the only part that touches the M × M·P score matrices) are computed here with
masked ``logsumexp``; :mod:`hdccf_triton.terms` turns them into the loss, as for every backend.
Rows are processed in chunks whose score matrices stay below :data:`CHUNK_ELEMENTS` entries,
each chunk under activation checkpointing, so forward and backward at M = 8192, P = 4 fit in
a few GiB. The similarity scores the chunks (:meth:`~hdccf_triton.similarity.Similarity.negative_scorer`)
and says how many working entries each (row, column) pair costs (``pair_cost``: 1 for a dot
product; for a :class:`~hdccf_triton.ModulatedSimilarity` the modulation of every pair is an
[rows, M·P, dim] tensor, and the per-entity parts of eq. 8, W₁e_i and W₂e_u, are products of
the un-broadcast operands, so only W₃(e_i⊙e_u) is pairwise).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from hdccf_triton.interactions import InteractionIndex
from hdccf_triton.options import LossOptions
from hdccf_triton.terms import LossInputs, NegativeStats, combine_terms, prepare_scores

__all__ = ["per_row_loss", "negative_statistics", "CHUNK_ELEMENTS"]

#: Largest working set of one chunk, in entries: its [rows, N·P] score matrices times the
#: similarity's ``pair_cost`` (a ModulatedSimilarity's [rows, N·P, dim] modulation tensors,
#: of which the backward of a chunk keeps about ten).
CHUNK_ELEMENTS = 1 << 22


def per_row_loss(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                 row_offset: int = 0, *, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """loss[k] of hdccf_triton/LOSS.md for every row (inputs validated, similarity reduced).

    Args:
        inputs: embeddings ``[M, d]`` of u_k and i_k, pools ``[N, P, d]`` (N = M, except under
            ``torch.distributed`` where they are the pools of all ranks), int64 ids.
            With a ModulatedSimilarity, d = 2·dim: users ``[p ‖ e]``, items ``[q ‖ e]``.
        interactions: the training pairs D, or None (only identity false negatives).
        options: the validated options.
        row_offset: row k's own block is pool block ``row_offset + k``.
        chunk_elements: the working set of one chunk of rows (:data:`CHUNK_ELEMENTS`).

    Returns:
        ``[M]`` per-row loss, in float32 for half-precision inputs, else the input dtype.
    """
    scores = prepare_scores(inputs, options, row_offset)
    stats = negative_statistics(inputs.with_embeddings(*scores[:4]), interactions, options, row_offset, chunk_elements=chunk_elements)
    return combine_terms(scores, stats, options)


def negative_statistics(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                        row_offset: int = 0, *, chunk_elements: int = CHUNK_ELEMENTS) -> NegativeStats:
    """Per-row log-sums over the (true) negatives and their counts, chunked over rows.

    Args:
        inputs: U, I ``[M, d]`` and X, Y ``[N, P, d]`` as the similarity scores them
            (:func:`~hdccf_triton.terms.prepare_scores`: normalised for a cosine; ``[p ‖ e]``
            / ``[q ‖ e]`` for a ModulatedSimilarity); users, items ``[M]``; pool_items,
            pool_users ``[N, P]``; row k's own block is pool block ``row_offset + k``.

    Returns:
        :class:`~hdccf_triton.terms.NegativeStats`, each field ``[M]``.
    """
    U, I, X, Y = inputs.embeddings
    users, items, pool_items, pool_users = inputs.ids
    M = U.shape[0]
    N, P, d = X.shape
    x_ids, y_ids = pool_items.reshape(-1), pool_users.reshape(-1)
    rows, cols, scorer = options.similarity.negative_scorer(U, I, X.reshape(N * P, d), Y.reshape(N * P, d))
    rows_per_chunk = max(1, chunk_elements // (N * P * options.similarity.pair_cost))
    use_checkpoint = torch.is_grad_enabled() and rows_per_chunk < M
    inv_tau = 1.0 / options.temperature

    def chunk(r0, *tensors):
        rows_c, cols_c = tensors[: len(rows)], tensors[len(rows) :]
        r1 = r0 + rows_c[0].shape[0]
        ids = (users[r0:r1], items[r0:r1], x_ids, y_ids)
        A, B, C, E = scorer(rows_c, cols_c, inv_tau)
        return _chunk_statistics(A, B, C, E, *ids, row_offset + r0, P, interactions, options)

    pieces = []
    for r0 in range(0, M, rows_per_chunk):
        args = (*(t[r0 : r0 + rows_per_chunk] for t in rows), *cols)
        if use_checkpoint:  # keep one chunk's activations alive, not all of them
            pieces.append(checkpoint(chunk, r0, *args, use_reentrant=False))
        else:
            pieces.append(chunk(r0, *args))
    return NegativeStats(*(torch.cat(parts) for parts in zip(*pieces)))


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


def previous_objective_loss(objective, batch) -> torch.Tensor:
    """``HDCCFObjective.forward`` before the speed-up: one table lookup per operand (four dense
    embedding gradients a step instead of two)."""
    users, items, pool_items, pool_users = batch
    m = objective.model
    return objective.loss_fn(m.user_table(users), m.item_table(items), m.item_table(pool_items),
                             m.user_table(pool_users), users, items, pool_items, pool_users)
