"""The PyTorch reference of the HDCCF loss: hdccf_triton/LOSS.md as readable code.

It is the test oracle of every other backend and the CPU path. The per-row log-sums over the
negatives (the only part that touches the M × N·P score matrices) are computed here;
:mod:`hdccf_triton.terms` turns them into the loss, as for every backend.

How it stays fast and small on a CPU:

* The false-negative masks (hdccf_triton/LOSS.md, "False negatives") are computed once per
  call, outside autograd, and read by the forward and the backward (``[M, N·P]`` bools: one
  byte a pair, against four bytes for one fp32 score matrix).
* For a bilinear similarity (:class:`~hdccf_triton.similarity.Dot`,
  :class:`~hdccf_triton.similarity.Cosine` on its normalised embeddings) the log-sums are one
  autograd.Function, :class:`_BilinearStatistics`, in the style of flash attention: the forward
  keeps only the per-row log-sums; the backward recomputes each chunk's score matrix and turns
  it in place into the softmax weights, so a chunk costs one ``[rows, N·P]`` temporary and the
  whole call 4 products forward and 4 + 8 backward. 1/τ is folded into the ``[M, d]`` rows
  before the products.
* Any other similarity (the modulated one) runs the chunks under activation checkpointing with
  the similarity's own scorer (:meth:`~hdccf_triton.similarity.Similarity.negative_scorer`); its
  working set per (row, column) pair is ``pair_cost`` entries (a ModulatedSimilarity's
  [rows, N·P, dim] modulation tensors; the per-entity parts of eq. 8, W₁e_i and W₂e_u, are
  products of the un-broadcast operands, so only W₃(e_i⊙e_u) is pairwise).

Rows are processed in chunks of at most :data:`CHUNK_ELEMENTS` working entries, so forward and
backward at M = 8192, P = 4 fit in a few GiB.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..interactions import InteractionIndex, csr_segments
from ..options import LossOptions
from ..terms import LossInputs, NegativeStats, column_log_q, combine_terms, prepare_scores

__all__ = ["per_row_loss", "negative_statistics", "true_negative_masks", "CHUNK_ELEMENTS", "MASK_ELEMENTS",
           "SAVED_WEIGHT_ELEMENTS"]

#: Largest working set of one chunk, in entries: its [rows, N·P] score matrices times the
#: similarity's ``pair_cost`` (a ModulatedSimilarity's [rows, N·P, dim] modulation tensors,
#: of which the backward of a chunk keeps about ten).
CHUNK_ELEMENTS = 1 << 22
#: Largest number of mask entries (2 × M × N·P) kept as 0/1 in the scores' dtype (64 MiB in
#: fp32); above, the masks stay bools and each chunk converts its rows.
MASK_ELEMENTS = 1 << 24
#: Largest number of softmax weights (4 families × M × N·P) the bilinear forward keeps for its
#: backward (64 MiB in fp32); above it the backward recomputes them chunk by chunk.
SAVED_WEIGHT_ELEMENTS = 1 << 24
#: The masks match the anchors' lists of D against the columns when the lists hold at most this
#: fraction of the M × C pairs (else each pair is looked up in D); 0 forces the lookups.
LISTS_MAX_FRACTION = 0.1


def per_row_loss(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                 row_offset: int = 0, *, chunk_elements: int = CHUNK_ELEMENTS,
                 saved_weight_elements: int = SAVED_WEIGHT_ELEMENTS, mask_elements: int = MASK_ELEMENTS,
                 ) -> torch.Tensor:
    """loss[k] of hdccf_triton/LOSS.md for every row (inputs validated, similarity reduced).

    Args:
        inputs: embeddings ``[M, d]`` of u_k and i_k, pools ``[N, P, d]`` (N = M, except under
            ``torch.distributed`` where they are the pools of all ranks), int64 ids.
            With a ModulatedSimilarity, d = 2·dim: users ``[p ‖ e]``, items ``[q ‖ e]``.
        interactions: the training pairs D, or None (only identity false negatives).
        options: the validated options.
        row_offset: row k's own block is pool block ``row_offset + k``.
        chunk_elements: the working set of one chunk of rows (:data:`CHUNK_ELEMENTS`).
        saved_weight_elements: the bilinear path keeps its softmax weights for the backward
            up to this many (:data:`SAVED_WEIGHT_ELEMENTS`), else recomputes them.
        mask_elements: the bilinear path keeps its masks in the scores' dtype up to this many
            entries (:data:`MASK_ELEMENTS`), else as bools converted chunk by chunk.

    Returns:
        ``[M]`` per-row loss, in float32 for half-precision inputs, else the input dtype.
    """
    scores = prepare_scores(inputs, options, row_offset)
    stats = negative_statistics(inputs.with_embeddings(*scores[:4], extra=scores.extra), interactions, options, row_offset,
                                chunk_elements=chunk_elements, saved_weight_elements=saved_weight_elements,
                                mask_elements=mask_elements)
    return combine_terms(scores, stats, options)


def negative_statistics(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                        row_offset: int = 0, *, chunk_elements: int = CHUNK_ELEMENTS,
                        saved_weight_elements: int = SAVED_WEIGHT_ELEMENTS,
                        mask_elements: int = MASK_ELEMENTS) -> NegativeStats:
    """Per-row log-sums over the true negatives and their counts, chunked over rows.

    Args:
        inputs: U, I ``[M, d]`` and X, Y ``[N, P, d]`` as the similarity scores them
            (:func:`~hdccf_triton.terms.prepare_scores`: normalised for a cosine; ``[p ‖ e]``
            / ``[q ‖ e]`` for a ModulatedSimilarity); users, items ``[M]``; pool_items,
            pool_users ``[N, P]``; row k's own block is pool block ``row_offset + k``.

    The columns are the N·P pool columns, then the B′ mixed negatives of ``inputs.extra``
    (prepared like X and Y), which A and B include and C and E do not; with ``inputs.log_q``
    every column's score is lowered by its correction ℓ (:func:`~hdccf_triton.terms.column_log_q`).

    Returns:
        :class:`~hdccf_triton.terms.NegativeStats`, each field ``[M]``.
    """
    U, I, X, Y = inputs.embeddings
    M = U.shape[0]
    N, P, d = X.shape
    NP = N * P
    X, Y = X.reshape(NP, d), Y.reshape(NP, d)
    if inputs.extra is not None:  # the mixed negatives: columns NP .. NP + B′ − 1
        X, Y = torch.cat([X, inputs.extra.item_emb.to(X.dtype)]), torch.cat([Y, inputs.extra.user_emb.to(Y.dtype)])
    bias = column_log_q(inputs, U.dtype)  # (ℓᴵ [C], ℓᵁ [C]) or None
    C = X.shape[0]
    similarity = options.similarity
    rows_per_chunk = max(1, chunk_elements // (C * similarity.pair_cost))
    true_item, true_user = true_negative_masks(inputs.ids, interactions, options.debias, row_offset, chunk_elements,
                                               extra=inputs.extra)
    inv_tau = 1.0 / options.temperature
    aux_counts = (None, None) if C == NP else (true_item[:, :NP].sum(-1), true_user[:, :NP].sum(-1))
    if similarity.bilinear:
        # the masks as 0/1 in the scores' dtype, which the bilinear path multiplies by (a bool
        # operand would be converted at every use); above MASK_ELEMENTS they stay bools (one
        # byte a pair) and each chunk converts its rows into a reused buffer
        masks = (true_item, true_user)
        if 2 * M * C <= mask_elements:
            as_dtype = true_item.to(U.dtype)  # without debiasing the two masks are one tensor
            masks = (as_dtype, as_dtype if true_user is true_item else true_user.to(U.dtype))
        counts = tuple(m.sum(-1, dtype=torch.int64) for m in masks)
        aux = tuple(c if a is None else a for c, a in zip(counts, aux_counts))
        # whether each family has a true negative, [group, row kind, M]: (A, E), (C, B)
        has = torch.stack([torch.stack([counts[0], aux[0]]), torch.stack([aux[1], counts[1]])]) > 0
        keep = 4 * M * C <= saved_weight_elements
        lse = _BilinearStatistics.apply(U, I, X, Y, *masks, has, inv_tau, rows_per_chunk, keep, bias, NP)
        return NegativeStats(*lse, *counts, *aux_counts)
    counts = (true_item.sum(-1), true_user.sum(-1))

    rows, cols, scorer = similarity.negative_scorer(U, I, X, Y)
    use_checkpoint = torch.is_grad_enabled() and rows_per_chunk < M

    def chunk(r0, *tensors):
        rows_c, cols_c = tensors[: len(rows)], tensors[len(rows) :]
        r1 = r0 + rows_c[0].shape[0]
        A, B, C_, E = scorer(rows_c, cols_c, inv_tau)
        if bias is not None:  # corrected scores: score − ℓ of the column
            A, B, C_, E = A - bias[0], B - bias[1], C_ - bias[1], E - bias[0]
        t_item, t_user = true_item[r0:r1], true_user[r0:r1]
        # A and B over every column, C and E over the pool columns only
        return tuple(_masked_logsumexp(S, t) for S, t in (
            (A, t_item), (B, t_user), (C_[:, :NP], t_user[:, :NP]), (E[:, :NP], t_item[:, :NP])))

    pieces = []
    for r0 in range(0, M, rows_per_chunk):
        args = (*(t[r0 : r0 + rows_per_chunk] for t in rows), *cols)
        if use_checkpoint:  # keep one chunk's activations alive, not all of them
            pieces.append(checkpoint(chunk, r0, *args, use_reentrant=False))
        else:
            pieces.append(chunk(r0, *args))
    return NegativeStats(*(torch.cat(parts) for parts in zip(*pieces)), *counts, *aux_counts)


@torch.no_grad()
def true_negative_masks(ids: tuple, interactions: InteractionIndex | None, debias: bool, row_offset: int,
                        chunk_elements: int = CHUNK_ELEMENTS, extra=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The true negatives of every row (hdccf_triton/LOSS.md, "False negatives"), as masks.

    Args:
        ids: users, items ``[M]``; pool_items, pool_users ``[N, P]`` (int64).
        interactions: the training pairs D, or None (identity false negatives only).
        debias: False: every column outside the own block is a negative (the biased loss).
        row_offset: row k's own block is pool block ``row_offset + k``.
        chunk_elements: rows are looked up in chunks of about this many pairs, which bounds
            the lookups' temporaries.
        extra: the mixed negatives (:class:`~hdccf_triton.terms.ExtraNegatives`), or None:
            their B′ columns follow the pool's, with the same test and no own block.

    Returns:
        ``(true_item, true_user)``, bool ``[M, N·P + B′]``: Tᴵ_k and Tᵁ_k. Column j is a true
        negative item of row k unless it lies in the own block, X_j is i_k, or (u_k, X_j) ∈ D
        (φᴵ); a true negative user unless own block, Y_j is u_k, or (Y_j, i_k) ∈ D (φᵁ).
    """
    users, items, pool_items, pool_users = ids
    M = users.shape[0]
    N, P = pool_items.shape
    x_ids, y_ids = pool_items.reshape(-1), pool_users.reshape(-1)
    if extra is not None:
        x_ids, y_ids = torch.cat([x_ids, extra.items]), torch.cat([y_ids, extra.users])
    if not debias:
        negative = torch.ones(M, x_ids.shape[0], dtype=torch.bool, device=users.device)
        _clear_own_blocks(negative, row_offset, P)
        return negative, negative
    true_item = _unobserved_and_other(users, items, x_ids, interactions, "items", chunk_elements)
    true_user = _unobserved_and_other(items, users, y_ids, interactions, "users", chunk_elements)
    _clear_own_blocks(true_item, row_offset, P)
    _clear_own_blocks(true_user, row_offset, P)
    return true_item, true_user


def _clear_own_blocks(mask: torch.Tensor, row_offset: int, P: int) -> None:
    """Clear the P columns of row k's own block (block ``row_offset + k``) of ``[M, C]`` (the
    pool's N·P columns first; any further, mixed-negative, columns belong to no block)."""
    M = mask.shape[0]
    rows = torch.arange(M, device=mask.device)
    mask[:, : mask.shape[1] // P * P].view(M, -1, P)[rows, rows + row_offset] = False


def _unobserved_and_other(anchors, partners, columns, interactions, kind: str, chunk_elements: int) -> torch.Tensor:
    """bool ``[M, C]``: column j of row k is neither ``partners[k]`` itself nor observed with ``anchors[k]``.

    ``kind="items"``: anchors are users, columns and partners items, the pairs (anchors[k],
    columns[j]); ``kind="users"``: anchors are items, columns and partners users, the pairs
    (columns[j], anchors[k]).

    Where the index keeps D as a dense table (:meth:`InteractionIndex.table`: ML-1M size),
    each row of the result is a gather from its anchor's row of it. Otherwise, when the
    anchors' lists in D (:meth:`InteractionIndex.lists`) hold at most LISTS_MAX_FRACTION ·
    M · C entries (sparse data such as Gowalla), the lists are matched against the sorted
    columns; else each of the M × C entries is looked up in D.
    """
    M, C = anchors.shape[0], columns.shape[0]
    out = torch.empty(M, C, dtype=torch.bool, device=anchors.device)
    step = max(1, chunk_elements // C)
    if interactions is None:
        for r0 in range(0, M, step):
            torch.ne(columns[None, :], partners[r0:r0 + step, None], out=out[r0:r0 + step])
        return out
    catalogue = interactions.num_items if kind == "items" else interactions.num_users
    observed = interactions.table(kind)  # [anchor ids, catalogue] bool, built once per index; None if large
    if observed is not None:
        rows = max(1, chunk_elements // max(C, catalogue))
        for r0 in range(0, M, rows):
            o_rows = slice(r0, r0 + rows)
            b_rows = observed.index_select(0, anchors[o_rows])  # [R, catalogue] a copy: the anchors' rows of D
            b_rows[torch.arange(b_rows.shape[0], device=b_rows.device), partners[o_rows]] = True  # the partner
            torch.gather(b_rows, 1, columns.expand(b_rows.shape[0], C), out=out[o_rows])
        return out.logical_not_()
    indptr, listed = interactions.lists(kind)
    if int((indptr[anchors + 1] - indptr[anchors]).sum()) <= LISTS_MAX_FRACTION * M * C:
        _observed_from_lists(anchors, columns, indptr, listed, catalogue, out)
        out |= columns[None, :] == partners[:, None]
        return out.logical_not_()
    for r0 in range(0, M, step):
        o_rows = slice(r0, r0 + step)
        b_out = out[o_rows]
        torch.eq(columns[None, :], partners[o_rows, None], out=b_out)
        if kind == "items":
            b_out |= interactions.contains(anchors[o_rows, None], columns[None, :])
        else:
            b_out |= interactions.contains(columns[None, :], anchors[o_rows, None])
        b_out.logical_not_()
    return out


def _observed_from_lists(anchors, columns, indptr, listed, catalogue: int, out) -> None:
    """``out [M, C]`` := whether column j is in row k's anchor's list (CSR ``indptr``, ``listed``;
    column ids below ``catalogue``).

    Every entry of the anchors' lists is looked up in a catalogue-sized table of the columns'
    distinct ids (one cache-resident read), and the columns it equals (a column id may repeat)
    are set: the cost follows the lists' lengths, not M × C lookups into D.
    """
    out.zero_()
    distinct, where, repeats = torch.unique(columns, return_inverse=True, return_counts=True)
    slot = torch.full((catalogue,), -1, dtype=torch.int64, device=out.device)
    slot[distinct] = torch.arange(distinct.numel(), device=out.device)
    local, flat = csr_segments(indptr, anchors)  # [T]: each list entry's row k, its place in `listed`
    s = slot.index_select(0, listed.index_select(0, flat))  # [T] the distinct column it equals, or −1
    hit = s >= 0
    local, s = local[hit], s[hit]
    order = torch.argsort(where, stable=True)  # the columns grouped by distinct id
    n, lo = repeats[s], (torch.cumsum(repeats, 0) - repeats)[s]
    total = int(n.sum())
    rows = torch.repeat_interleave(local, n, output_size=total)
    first = torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n, output_size=total)
    out[rows, order[first + torch.arange(total, device=out.device)]] = True


class _BilinearStatistics(torch.autograd.Function):
    """(U, I, X, Y) ↦ (lse_A, lse_B, lse_C, lse_E), each ``[M]``: log Σ e^score over the true
    negatives, for A = UXᵀ/τ, B = IYᵀ/τ, C = UYᵀ/τ, E = IXᵀ/τ; −inf where a row has none.

    Shapes: U, I ``[M, d]``; X, Y ``[C, d]``; the masks ``[M, C]`` (1 on a true negative,
    else 0, in the dtype of U); has ``[2, 2, M]`` bool: the row has a true negative in
    family (A, E), (C, B). Columns from ``n_pool`` on (the mixed negatives) count for A and B
    only. ``bias``: None, or ``(ℓᴵ, ℓᵁ)`` ``[C]``, subtracted from the X and the Y columns' scores.

    The families come in two column groups that share their columns and their mask: X with
    (A, E) and the item mask, Y with (C, B) and the user mask. Each group is one product of
    the stacked rows [U; I]/τ ``[2R, d]`` with its columns, per chunk of R rows (fewer,
    larger products: faster on a CPU).

    Forward, per chunk: the scores, shifted by each row's largest score over *all* columns,
    exponentiated and multiplied by the mask, summed. Masking by a product after the
    exponential keeps every exponential finite (and several times faster than filling −inf
    before it); a row whose true negatives all lie more than ~80 below its largest score would
    underflow, so such rows (rare) are redone with the exact masked shift. With ``keep`` the
    masked exponentials are kept for the backward, else the backward recomputes them chunk by
    chunk from the log-sums: W = e^min(s − lse, 0) ⊙ mask. With g the upstream gradient,
    dU = (g_A W_A X + g_C W_C Y)/τ, dI = (g_E W_E X + g_B W_B Y)/τ, dX = W_Aᵀ(g_A U)/τ +
    W_Eᵀ(g_E I)/τ, dY = W_Cᵀ(g_C U)/τ + W_Bᵀ(g_B I)/τ, accumulated chunk by chunk in a fixed
    order (deterministic).
    """

    @staticmethod
    def forward(ctx, U, I, X, Y, true_item, true_user, has, inv_tau: float, rows: int, keep: bool, bias, n_pool: int):
        M, NP = U.shape[0], X.shape[0]
        UI = torch.stack([U, I]).mul_(inv_tau)  # [2, M, d]: 1/τ folded into the rows
        lse = U.new_empty(2, 2, M)  # [group, (U, I) rows, M]: (A, E), (C, B)
        # the masked exponentials of both groups ([2, 2, M, NP]), or one chunk's buffer
        buffer = U.new_empty(2, 2, M, NP) if keep else U.new_empty(1, 2, min(rows, M), NP)
        scale = U.new_empty(2, 2, M)  # 1 / Σ: the softmax is the masked exponentials times it
        tiny = torch.finfo(U.dtype).tiny / torch.finfo(U.dtype).eps  # below it a sum may have underflowed
        rows_of = _mask_rows(true_item, U.dtype, min(rows, M))
        for r0 in range(0, M, rows):
            o_rows = slice(r0, r0 + rows)
            R = min(rows, M - r0)
            b_rows = UI[:, o_rows].reshape(2 * R, -1)  # [2R, d] the chunk's U and I rows, stacked
            for grp, (col, mask) in enumerate(((X, true_item), (Y, true_user))):
                b_s = buffer[grp, :, o_rows] if keep else buffer[0, :, :R]  # [2, R, NP]
                b_mask = rows_of(mask, o_rows)  # [R, NP], shared by the U and the I rows
                if b_s.is_contiguous():  # one chunk, or the reused buffer
                    torch.mm(b_rows, col.T, out=b_s.view(2 * R, NP))  # the scores of both families
                else:  # kept and chunked: the chunk's rows are strided in the [2, 2, M, NP] buffer
                    b_s.copy_((b_rows @ col.T).view(2, R, NP))
                if bias is not None:
                    b_s.sub_(bias[grp])  # the corrected scores s − ℓ
                b_max = b_s.amax(dim=-1, keepdim=True)  # [2, R, 1] over all columns
                b_s.sub_(b_max).exp_().mul_(b_mask)
                if n_pool < NP:  # the mixed negatives are not columns of C, E
                    b_s[_AUX_KIND[grp], :, n_pool:] = 0
                b_sum = b_s.sum(dim=-1)  # [2, R] Σ_true e^(s − max)
                redo = (b_sum < tiny) & has[grp, :, o_rows]  # underflowed: shift by the true max instead
                if redo.any():
                    _redo_rows(b_s, b_rows.view(2, R, -1), col, b_mask, redo, b_max, b_sum,
                               None if bias is None else bias[grp], _AUX_KIND[grp], n_pool)
                scale[grp, :, o_rows] = b_sum.reciprocal()  # inf where no true negative (weights 0)
                lse[grp, :, o_rows] = b_sum.log_().add_(b_max[..., 0])  # −inf where there is none
        scale.nan_to_num_(posinf=0.0)
        ctx.save_for_backward(UI, X, Y, true_item, true_user, lse, buffer if keep else None, scale)
        ctx.inv_tau, ctx.rows, ctx.keep, ctx.bias, ctx.n_pool = inv_tau, rows, keep, bias, n_pool
        (lse_a, lse_e), (lse_c, lse_b) = lse
        return tuple(t.clone() for t in (lse_a, lse_b, lse_c, lse_e))  # independent outputs

    @staticmethod
    def backward(ctx, g_a, g_b, g_c, g_e):
        UI, X, Y, true_item, true_user, lse, weights, scale = ctx.saved_tensors
        inv_tau, rows, M, NP = ctx.inv_tau, ctx.rows, UI.shape[1], X.shape[0]
        need_rows = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_cols = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        zero = UI.new_zeros(M)
        # the upstream gradients by group and row kind, [2, 2, M]; with keep the softmax is the
        # kept masked exponentials times 1/Σ, folded into g
        g = torch.stack([torch.stack([t if t is not None else zero for t in pair])
                         for pair in ((g_a, g_e), (g_c, g_b))]).to(UI.dtype)
        if ctx.keep:
            g = g * scale
        dUI = torch.zeros_like(UI)  # gradients of the scaled rows, [2, M, d]
        # the columns' gradients accumulate transposed, [d, NP]: a faster product on a CPU
        dXT, dYT = X.new_zeros(X.shape[1], NP), Y.new_zeros(Y.shape[1], NP)
        neg_lse = lse.masked_fill(torch.isneginf(lse), 0.0).neg_()  # rows with no true negative: weights 0
        b_w = None if ctx.keep else UI.new_empty(2, min(rows, M), NP)  # one buffer for every chunk
        rows_of = _mask_rows(true_item, UI.dtype, min(rows, M))
        for grp, (col, mask, d_col) in enumerate(((X, true_item, dXT), (Y, true_user, dYT))):
            for r0 in range(0, M, rows):
                o_rows = slice(r0, r0 + rows)
                R = min(rows, M - r0)
                b_rows = UI[:, o_rows]  # [2, R, d]
                if ctx.keep:
                    b_cur = weights[grp, :, o_rows].reshape(2 * R, NP)
                else:  # softmax weights e^(s − lse) on the true negatives, 0 elsewhere
                    b_cur = b_w[:, :R]
                    b_stack = b_rows.reshape(2 * R, -1)
                    torch.addmm(neg_lse[grp, :, o_rows].reshape(2 * R, 1), b_stack, col.T, out=b_cur.view(2 * R, NP))
                    if ctx.bias is not None:
                        b_cur.sub_(ctx.bias[grp])  # s − ℓ − lse
                    b_cur = b_cur.clamp_max_(0.0).exp_().mul_(rows_of(mask, o_rows))  # s ≤ lse
                    if ctx.n_pool < NP:
                        b_cur[_AUX_KIND[grp], :, ctx.n_pool:] = 0
                    b_cur = b_cur.view(2 * R, NP)
                b_g = g[grp, :, o_rows, None]  # [2, R, 1]: g scales rows, applied to the [R, d] factors
                if need_rows:
                    dUI[:, o_rows] += (b_cur @ col).view(2, R, -1).mul_(b_g)
                if need_cols:
                    d_col.addmm_((b_rows * b_g).reshape(2 * R, -1).T, b_cur)  # (Wᵀ · (g ⊙ row))ᵀ
        dUI.mul_(inv_tau)
        dX, dY = (dXT.T.contiguous(), dYT.T.contiguous()) if need_cols else (None, None)
        return dUI[0], dUI[1], dX, dY, None, None, None, None, None, None, None, None


#: the row kind (0: the U rows, 1: the I rows) of each column group's auxiliary family: E = IXᵀ in
#: the X group (A, E), C = UYᵀ in the Y group (C, B)
_AUX_KIND = (1, 0)


def _mask_rows(mask: torch.Tensor, dtype: torch.dtype, rows: int):
    """``rows_of(mask, o_rows)``: the rows of a mask as 0/1 in ``dtype``; a bool mask is
    converted into one reused ``[rows, N·P]`` buffer."""
    if mask.dtype != torch.bool:
        return lambda m, o_rows: m[o_rows]
    buffer = torch.empty(rows, mask.shape[1], dtype=dtype, device=mask.device)

    def rows_of(m, o_rows):
        b_rows = m[o_rows]
        return buffer[: b_rows.shape[0]].copy_(b_rows)

    return rows_of


def _redo_rows(b_s, b_rows, col, b_mask, redo, b_max, b_sum, bias=None, aux_kind: int = 0, n_pool: int | None = None) -> None:
    """Rows whose masked sum underflowed: shift by the largest *true-negative* score instead.

    ``b_s`` ``[2, R, NP]`` (the masked exponentials), ``b_max`` ``[2, R, 1]`` and ``b_sum``
    ``[2, R]`` are updated in place for the ``redo`` ``[2, R]`` rows; ``b_rows`` ``[2, R, d]``,
    ``b_mask`` ``[R, NP]``."""
    kind, row = redo.nonzero(as_tuple=True)
    s = b_rows[kind, row] @ col.T  # [r, NP] the scores again
    if bias is not None:
        s.sub_(bias)
    s.masked_fill_(b_mask[row] == 0, -math.inf)
    if n_pool is not None and n_pool < s.shape[1]:
        s[kind == aux_kind, n_pool:] = -math.inf  # the auxiliary family has no mixed negatives
    m = s.amax(dim=-1, keepdim=True)
    e = s.sub_(m).exp_()  # 0 off the true negatives
    b_s[kind, row] = e
    b_max[kind, row] = m
    b_sum[kind, row] = e.sum(dim=-1)


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Σ_{mask} eˣ over the last dim; −inf (with zero gradient) where the mask is empty."""
    return torch.logsumexp(x.masked_fill(mask.logical_not(), -math.inf), dim=-1)
