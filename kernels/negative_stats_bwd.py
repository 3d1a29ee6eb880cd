"""Backward of the fused negative statistics: gradients of the four log-sum-exps.

With upstream gradients g_A, g_B, g_C, g_E ``[M]`` of lse_A .. lse_E and the softmax weights
on the true negatives (0 off the mask, and 0 on a row whose lse is −inf: its mask is empty)

    p_A[k, j] = exp(A[k, j] − lse_A[k])   for j ∈ Tᴵ_k      (p_E likewise, p_B and p_C on Tᵁ_k)

the gradients of lse = log Σ exp(score) are

    dU[k] = (1/τ) Σ_j ( g_A[k] p_A[k, j] X_j + g_C[k] p_C[k, j] Y_j )
    dI[k] = (1/τ) Σ_j ( g_B[k] p_B[k, j] Y_j + g_E[k] p_E[k, j] X_j )
    dX[j] = (1/τ) Σ_k ( g_A[k] p_A[k, j] U_k + g_E[k] p_E[k, j] I_k )
    dY[j] = (1/τ) Σ_k ( g_B[k] p_B[k, j] I_k + g_C[k] p_C[k, j] U_k )

The diagonal and own-block scores of the forward (s = U_k·I_k/τ, own_A[k, p] = U_k·X_o/τ, …
with o = o(k, p) the own columns of row k) add, with their upstream gradients g_s, g_own:

    dU[k] += (1/τ) ( g_s[k] I_k + Σ_p g_ownA[k, p] X_o + g_ownC[k, p] Y_o )
    dI[k] += (1/τ) ( g_s[k] U_k + Σ_p g_ownB[k, p] Y_o + g_ownE[k, p] X_o )
    dX[o] += (1/τ) ( g_ownA[k, p] U_k + g_ownE[k, p] I_k )
    dY[o] += (1/τ) ( g_ownB[k, p] I_k + g_ownC[k, p] U_k )

added in fp32 (fp64) to the accumulators before the single store: the row pass's split 0
adds the first two, the column pass (whose split owns row k) the last two; each own column
belongs to one row, so this needs no atomics either.

For cosine similarity (``COSINE``) the kernels read the raw embeddings and their inverse norms
r = 1/max(‖e‖, ε): score tiles are dot·r_row·r_col/τ, the weights carry the other side's r so
that the sums above are the gradients of the normalised embeddings ê, and each program maps
its rows' (columns') gradients back to the raw embeddings at the end
(:func:`unnormalized_grad`): nothing normalised is stored.

In base 2, as the forward: p = 2^(t·f − lse₂) with t the tile's products (times the column's
inverse norm for cosine), f = log2(e)/τ (times the row's) and lse₂ = lse·log2(e) as the forward
wrote it: one FFMA and one ``MUFU.EX2`` per weight. The true-negative masks are formed just
before the two score tiles that use each (Tᴵ for A and E, Tᵁ for B and C).

The forward's options (constexprs; off, the code is that of the plain loss):

* ``LOGQ``, the sampling-bias correction (hdccf_triton/LOSS.md, "Sampling-bias correction"):
  the scores in the sums are the corrected ones, A[k, j] − ℓᴵ_j, …, so the weights are
  p_A[k, j] = exp(A[k, j] − ℓᴵ_j − lse_A[k]) = 2^(t·f − q₂[j] − lse₂) with q₂ = ℓ·log2(e)
  (``QX``, ``QY`` ``[C]``): s₂ = t·f − q₂ rounded as the forward rounds it, then minus lse₂
  (:func:`grad_weights2_biased`). ℓ is a constant, so the formulas for dU .. dY are as above.
* ``EXTRA``, mixed negatives (hdccf_triton/LOSS.md, "Mixed negatives"): columns j in
  [n_pool, C) of X, Y are the B′ extra negatives; they carry weights of A and B only (the
  weights of C and E are 0 there: :func:`~.negative_stats_fwd.pool_columns`), and no own block
  (the column pass's owner row of an extra column, j // P − row_offset ≥ N − row_offset ≥ M,
  is never among its rows, so the own-block terms skip it). The column pass writes dX, dY for
  all C columns; the host's ``torch.cat`` of pools and extras routes them back.

* ``MASK_BITS``: the true-negative masks are read from the batch's bits, computed once in the
  forward (``negative_mask.py``: one bit test per pair instead of two gathers from D); the
  same masks, so the same results bit for bit.

Two kernels, no atomics (bit-identical results run to run): a row-parallel one for dU, dI
(each program owns BLOCK_M rows and sweeps the columns) and a column-parallel one for dX, dY
(each program owns BLOCK_N columns and sweeps the rows). Both recompute the score tiles and
the true-negative masks in the forward's orientation [rows, columns] and operand order, so the
recomputed scores match the forward's and the weights p are consistent with its lse (a
transposed product X·Uᵀ would round differently: in fp32 with scores of a few hundred that
alone makes the pool gradients several times less accurate). Either sweep
may be cut into splits (``grid[1]``) that write partial sums, added by the host in a fixed
order. The weights p are cast to the embeddings' dtype before the second product (as flash
attention does with P·V), so bf16/fp16 inputs run on bf16/fp16 tensor cores.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .membership import own_block_excluded, true_item_mask, true_user_mask
from .negative_mask import bits_mask, column_bits, tile_bits
from .negative_stats_fwd import (
    SCALE_INV_TAU, SCALE_LOG2E_TAU, column_bias, column_scaled, inv_norms, load_own_block, normalized,
    pool_columns, score_dot,
)

_add = tl.standard._sum_combine  # tl.sum's combine function (see negative_stats_fwd.py)

__all__ = ["negative_stats_bwd_rows_kernel", "negative_stats_bwd_cols_kernel", "grad_weights", "grad_weights2",
           "grad_weights2_biased", "weights2", "load_own_grads", "scale_weights", "unnormalized_grad"]


@triton.jit
def grad_weights(b_s, b_lse, b_g, m_s):
    """g · exp(s − lse) on the mask, 0 off it (lse, g broadcast along the tile's other axis)."""
    # the where comes first: off the mask s − lse may be +inf (lse = −inf on an empty row)
    return tl.exp(tl.where(m_s, b_s - b_lse, float("-inf"))) * b_g


@triton.jit
def grad_weights2(b_t, b_f, b_lse2, b_g, m_s):
    """g · exp(s − lse) = g · 2^(t·f − lse₂) on the mask, 0 off it, in base 2 (as the forward):
    t the tile's products (times r_col for cosine), f ``[BLOCK_M, 1]`` the row factor
    log2(e)/τ (times r_row), lse₂ = lse·log2(e) and g ``[BLOCK_M, 1]``: one FFMA, one MUFU.EX2."""
    # the where comes after the FFMA: off the mask t·f − lse₂ may be +inf (lse = −inf, empty row)
    return tl.math.exp2(tl.where(m_s, b_t * b_f - b_lse2, float("-inf"))) * b_g


@triton.jit
def grad_weights2_biased(b_t, b_f, b_q, b_lse2, b_g, m_s):
    """:func:`grad_weights2` of corrected scores (the sampling-bias correction):
    g · 2^(s₂ − lse₂) with s₂ = t·f − q₂[j] (q₂ ``[BLOCK_N]`` the columns' ℓ·log2(e)), formed
    as the forward forms it (one FFMA, rounded once), on the mask, 0 off it."""
    b_s = b_t * b_f - b_q[None, :]  # [BLOCK_M, BLOCK_N] s₂, as in the forward
    return tl.math.exp2(tl.where(m_s, b_s - b_lse2, float("-inf"))) * b_g


@triton.jit
def weights2(b_t, b_f, b_q, b_lse2, b_g, m_s, LOGQ: tl.constexpr):
    """The weights g·p of a tile: :func:`grad_weights2_biased` with the columns' corrections
    ``b_q`` under ``LOGQ``, else :func:`grad_weights2` (``b_q`` unused)."""
    if LOGQ:
        b_w = grad_weights2_biased(b_t, b_f, b_q, b_lse2, b_g, m_s)
    else:
        b_w = grad_weights2(b_t, b_f, b_lse2, b_g, m_s)
    return b_w


@triton.jit
def scale_weights(b_w, b_r, AXIS: tl.constexpr, COSINE: tl.constexpr):
    """For cosine, the weights times the inverse norms along the tile's columns (AXIS = 1) or
    rows (AXIS = 0): they then multiply the raw embeddings as they would the normalised ones."""
    if COSINE:
        if AXIS == 1:
            b_w = b_w * b_r[None, :]
        else:
            b_w = b_w * b_r[:, None]
    return b_w


@triton.jit
def unnormalized_grad(b_g, b_e, R, o, m, COSINE: tl.constexpr):
    """For cosine, the gradient of raw embeddings e from that of ê = e / max(‖e‖, ε):

        de = r·(dê − (ê·dê)·ê),  r = 1/‖e‖,   or  dê / ε  for a clamped row (R < 0 marks it).

    Linear in dê, so it applies to each split's partial sum alike."""
    if COSINE:
        b_r = tl.load(R + o, mask=m, other=1.0)  # [n]
        b_eh = b_e.to(b_g.dtype) * tl.where(b_r > 0, b_r, 0.0)[:, None]  # [n, BLOCK_D] ê (0 if clamped)
        b_g = (b_g - tl.reduce(b_eh * b_g, 1, _add)[:, None] * b_eh) * tl.abs(b_r)[:, None]
    return b_g


@triton.jit
def load_own_grads(p_g, MP, m_g):
    """g_ownA, g_ownB, g_ownC, g_ownE at the offsets ``p_g`` of GOWN ``[4, M, P]`` (MP = M·P),
    0 off the mask: four ``[n, 1]`` tiles."""
    b_go_a = tl.load(p_g, mask=m_g, other=0.0)[:, None]
    b_go_b = tl.load(p_g + MP, mask=m_g, other=0.0)[:, None]
    b_go_c = tl.load(p_g + 2 * MP, mask=m_g, other=0.0)[:, None]
    b_go_e = tl.load(p_g + 3 * MP, mask=m_g, other=0.0)[:, None]
    return b_go_a, b_go_b, b_go_c, b_go_e


@triton.jit
def negative_stats_bwd_rows_kernel(
    U, I,  # [M, D] user and item embeddings of the rows
    X, Y,  # [NP, D] the columns: flattened pool items and pool users (then the B′ extra ones under EXTRA)
    users, items,  # [M] int64 anchor ids
    x_ids, y_ids,  # [NP] int64 column ids
    index, n_keys, num_items,  # D (see membership.py)
    scale,  # [4] 1/τ, log2(e)/τ, log2(e), ln 2 in the accumulation dtype
    RU, RI, RX, RY,  # [M], [M], [NP], [NP] inverse norms (read for COSINE only)
    QX, QY,  # [NP], [NP] base-2 corrections ℓᴵ·log2(e), ℓᵁ·log2(e) (accumulation dtype; read for LOGQ only)
    BI, BU,  # [M, W] int32 bits of Tᴵ, Tᵁ (negative_mask.py; read for MASK_BITS only)
    LSE,  # [4, M] lse_A, lse_B, lse_C, lse_E in base 2 (lse₂ = lse·log2 e, as the forward wrote them)
    G,  # [4, M] their upstream gradients (accumulation dtype)
    GS,  # [M] upstream gradient of s (accumulation dtype)
    GOWN,  # [4, M, P] upstream gradients of own_A, own_B, own_C, own_E (accumulation dtype)
    DU, DI,  # [S, M, D] out: partial dU, dI per column split (fp32/fp64; the input dtype when S = 1)
    M, NP, D, P, row_offset, cols_per_split,
    n_pool,  # the pool columns N·P (NP − B′; read for EXTRA only)
    W,  # words a row of BI, BU (read for MASK_BITS only)
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    UPCAST: tl.constexpr, COSINE: tl.constexpr, LOGQ: tl.constexpr, EXTRA: tl.constexpr,
    MASK_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_m = o_m < M
    m_d = o_d < D
    inv_tau = tl.load(scale + SCALE_INV_TAU)
    scale2 = tl.load(scale + SCALE_LOG2E_TAU)  # log2(e)/τ

    p_row = o_m.to(tl.int64)[:, None] * D + o_d[None, :]
    m_row = m_m[:, None] & m_d[None, :]
    b_u = tl.load(U + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_i = tl.load(I + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_user = tl.load(users + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
    b_item = tl.load(items + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
    b_block = row_offset + o_m  # [BLOCK_M]
    b_first = b_block * P  # [BLOCK_M] first column of each row's own block
    b_ru = inv_norms(RU, o_m, m_m, COSINE)  # [BLOCK_M] (1 without COSINE)
    b_ri = inv_norms(RI, o_m, m_m, COSINE)  # [BLOCK_M]
    # per-row factors f of the base-2 scores, as in the forward: log2(e)/τ (times r for cosine)
    b_fu = (b_ru * scale2 + tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype))[:, None]  # [BLOCK_M, 1]
    b_fi = (b_ri * scale2 + tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype))[:, None]  # [BLOCK_M, 1]
    # row statistics (lse₂: base 2); rows out of range get lse = −inf and g = 0 (all weights 0)
    b_lse_a = (tl.load(LSE + o_m, mask=m_m, other=float("-inf")))[:, None]  # [BLOCK_M, 1]
    b_lse_b = (tl.load(LSE + M + o_m, mask=m_m, other=float("-inf")))[:, None]
    b_lse_c = (tl.load(LSE + 2 * M + o_m, mask=m_m, other=float("-inf")))[:, None]
    b_lse_e = (tl.load(LSE + 3 * M + o_m, mask=m_m, other=float("-inf")))[:, None]
    b_g_a = tl.load(G + o_m, mask=m_m, other=0.0)[:, None]  # [BLOCK_M, 1]
    b_g_b = tl.load(G + M + o_m, mask=m_m, other=0.0)[:, None]
    b_g_c = tl.load(G + 2 * M + o_m, mask=m_m, other=0.0)[:, None]
    b_g_e = tl.load(G + 3 * M + o_m, mask=m_m, other=0.0)[:, None]

    b_du = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_di = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)

    p_bits = o_m.to(tl.int64) * W  # [BLOCK_M] the rows' first words in BI, BU (MASK_BITS)
    b_bit = column_bits(BLOCK_N)  # [BLOCK_N] each tile column's bit in its word (MASK_BITS)

    col_start = i_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, NP)
    for j0 in range(col_start, col_end, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_n = o_n < col_end
        p_col = o_n.to(tl.int64)[:, None] * D + o_d[None, :]
        m_col = m_n[:, None] & m_d[None, :]
        b_x = tl.load(X + p_col, mask=m_col, other=0.0)  # [BLOCK_N, BLOCK_D]
        b_y = tl.load(Y + p_col, mask=m_col, other=0.0)  # [BLOCK_N, BLOCK_D]
        b_xid = tl.load(x_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
        b_yid = tl.load(y_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
        b_rx = inv_norms(RX, o_n, m_n, COSINE)  # [BLOCK_N]
        b_ry = inv_norms(RY, o_n, m_n, COSINE)  # [BLOCK_N]
        b_qx = column_bias(QX, o_n, m_n, LOGQ)  # [BLOCK_N] q₂ of the X columns (0, unread, without LOGQ)
        b_qy = column_bias(QY, o_n, m_n, LOGQ)  # [BLOCK_N] q₂ of the Y columns
        if MASK_BITS:  # the masks from the batch's bits (negative_mask.py)
            b_lo_i, b_hi_i = tile_bits(BI + p_bits, m_m, j0, col_end, BLOCK_N)  # [BLOCK_M] bits of Tᴵ
            b_lo_u, b_hi_u = tile_bits(BU + p_bits, m_m, j0, col_end, BLOCK_N)  # [BLOCK_M] bits of Tᵁ
            m_item = bits_mask(b_lo_i, b_hi_i, b_bit, BLOCK_N)  # [BLOCK_M, BLOCK_N]
            m_user = bits_mask(b_lo_u, b_hi_u, b_bit, BLOCK_N)
        else:
            # the negatives: in range, outside the row's own block
            m_neg = own_block_excluded(b_first[:, None], o_n[None, :], m_m[:, None] & m_n[None, :], P)
            # Tᴵ (masks A, E);  Tᵁ (masks B, C) here too for FMA products (fp32/fp64) and d > 64, else
            # just before its two tiles: what ptxas allocates best (bench/sass_report.py)
            m_item = true_item_mask(m_neg, b_user[:, None], b_item[:, None], b_xid[None, :],
                                    index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)  # [BLOCK_M, BLOCK_N]
            if b_u.dtype.is_fp32() or b_u.dtype.is_fp64() or BLOCK_D > 64:
                m_user = true_user_mask(m_neg, b_user[:, None], b_item[:, None], b_yid[None, :],
                                        index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)
        # w_A = g_A·p_A with A = U Xᵀ / τ;  dU += w_A X
        # (p = 2^(t·f − lse₂), LOGQ: 2^(t·f − q₂ − lse₂); cosine: w carries r_X)
        b_t = column_scaled(score_dot(b_u, tl.trans(b_x), UPCAST), b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w = scale_weights(weights2(b_t, b_fu, b_qx, b_lse_a, b_g_a, m_item, LOGQ), b_rx, 1, COSINE)
        b_du += score_dot(b_w.to(b_x.dtype), b_x, UPCAST)  # [BLOCK_M, BLOCK_D]
        # w_E = g_E·p_E with E = I Xᵀ / τ;  dI += w_E X   (EXTRA: pool columns only)
        b_t = column_scaled(score_dot(b_i, tl.trans(b_x), UPCAST), b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w = weights2(b_t, b_fi, b_qx, b_lse_e, b_g_e, pool_columns(m_item, o_n, n_pool, EXTRA), LOGQ)
        b_w = scale_weights(b_w, b_rx, 1, COSINE)
        b_di += score_dot(b_w.to(b_x.dtype), b_x, UPCAST)  # [BLOCK_M, BLOCK_D]

        if not (MASK_BITS or b_u.dtype.is_fp32() or b_u.dtype.is_fp64() or BLOCK_D > 64):
            m_user = true_user_mask(m_neg, b_user[:, None], b_item[:, None], b_yid[None, :],
                                    index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)
        # w_C = g_C·p_C with C = U Yᵀ / τ;  dU += w_C Y   (EXTRA: pool columns only)
        b_t = column_scaled(score_dot(b_u, tl.trans(b_y), UPCAST), b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w = weights2(b_t, b_fu, b_qy, b_lse_c, b_g_c, pool_columns(m_user, o_n, n_pool, EXTRA), LOGQ)
        b_w = scale_weights(b_w, b_ry, 1, COSINE)
        b_du += score_dot(b_w.to(b_y.dtype), b_y, UPCAST)  # [BLOCK_M, BLOCK_D]
        # w_B = g_B·p_B with B = I Yᵀ / τ;  dI += w_B Y
        b_t = column_scaled(score_dot(b_i, tl.trans(b_y), UPCAST), b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w = scale_weights(weights2(b_t, b_fi, b_qy, b_lse_b, b_g_b, m_user, LOGQ), b_ry, 1, COSINE)
        b_di += score_dot(b_w.to(b_y.dtype), b_y, UPCAST)  # [BLOCK_M, BLOCK_D]

    if i_s == 0:  # the diagonal and the own blocks, once (in split 0)
        # dU += g_s I + Σ_p g_ownA X_o + g_ownC Y_o;  dI += g_s U + Σ_p g_ownB Y_o + g_ownE X_o
        b_gs = tl.load(GS + o_m, mask=m_m, other=0.0)[:, None]  # [BLOCK_M, 1]
        b_du += b_gs * normalized(b_i, b_ri, b_du.dtype, COSINE)
        b_di += b_gs * normalized(b_u, b_ru, b_di.dtype, COSINE)
        MP = M * P
        for p in range(0, P):
            b_xo, b_yo = load_own_block(X, Y, b_block, p, P, D, o_d, m_row, b_du.dtype)  # [BLOCK_M, BLOCK_D]
            o_own = b_block * P + p  # [BLOCK_M] own columns
            b_xo = normalized(b_xo, inv_norms(RX, o_own, m_m, COSINE), b_du.dtype, COSINE)
            b_yo = normalized(b_yo, inv_norms(RY, o_own, m_m, COSINE), b_du.dtype, COSINE)
            b_go_a, b_go_b, b_go_c, b_go_e = load_own_grads(GOWN + o_m.to(tl.int64) * P + p, MP, m_m)
            b_du += b_go_a * b_xo + b_go_c * b_yo
            b_di += b_go_b * b_yo + b_go_e * b_xo

    # cosine: from the normalised rows' gradients to the raw ones
    b_du = unnormalized_grad(b_du, b_u, RU, o_m, m_m, COSINE)
    b_di = unnormalized_grad(b_di, b_i, RI, o_m, m_m, COSINE)

    # dU, dI = (1/τ)·(accumulated sums), into this split's slice
    p_out = i_s.to(tl.int64) * M * D + p_row
    tl.store(DU + p_out, b_du * inv_tau, mask=m_row)
    tl.store(DI + p_out, b_di * inv_tau, mask=m_row)


@triton.jit
def negative_stats_bwd_cols_kernel(
    U, I,  # [M, D] user and item embeddings of the rows
    X, Y,  # [NP, D] the columns: flattened pool items and pool users (then the B′ extra ones under EXTRA)
    users, items,  # [M] int64 anchor ids
    x_ids, y_ids,  # [NP] int64 column ids
    index, n_keys, num_items,  # D (see membership.py)
    scale,  # [4] 1/τ, log2(e)/τ, log2(e), ln 2 in the accumulation dtype
    RU, RI, RX, RY,  # [M], [M], [NP], [NP] inverse norms (read for COSINE only)
    QX, QY,  # [NP], [NP] base-2 corrections ℓᴵ·log2(e), ℓᵁ·log2(e) (accumulation dtype; read for LOGQ only)
    BI, BU,  # [M, W] int32 bits of Tᴵ, Tᵁ (negative_mask.py; read for MASK_BITS only)
    LSE,  # [4, M] lse_A, lse_B, lse_C, lse_E in base 2 (lse₂ = lse·log2 e, as the forward wrote them)
    G,  # [4, M] their upstream gradients (accumulation dtype)
    GS,  # [M] upstream gradient of s (unused here: s depends on U and I only)
    GOWN,  # [4, M, P] upstream gradients of own_A, own_B, own_C, own_E (accumulation dtype)
    DX, DY,  # [S, NP, D] out: partial dX, dY per row split (fp32/fp64; the input dtype when S = 1)
    M, NP, D, P, row_offset, rows_per_split,
    n_pool,  # the pool columns N·P (NP − B′; read for EXTRA only)
    W,  # words a row of BI, BU (read for MASK_BITS only)
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    UPCAST: tl.constexpr, COSINE: tl.constexpr, LOGQ: tl.constexpr, EXTRA: tl.constexpr,
    MASK_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_n = o_n < NP
    m_d = o_d < D
    inv_tau = tl.load(scale + SCALE_INV_TAU)
    scale2 = tl.load(scale + SCALE_LOG2E_TAU)  # log2(e)/τ

    # the columns' embeddings stay in registers for the whole sweep
    p_col = o_n.to(tl.int64)[:, None] * D + o_d[None, :]
    m_col = m_n[:, None] & m_d[None, :]
    b_x = tl.load(X + p_col, mask=m_col, other=0.0)  # [BLOCK_N, BLOCK_D]
    b_y = tl.load(Y + p_col, mask=m_col, other=0.0)  # [BLOCK_N, BLOCK_D]
    b_xid = tl.load(x_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
    b_yid = tl.load(y_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
    b_owner = o_n // P  # [BLOCK_N]
    b_rx = inv_norms(RX, o_n, m_n, COSINE)  # [BLOCK_N] (1 without COSINE)
    b_ry = inv_norms(RY, o_n, m_n, COSINE)  # [BLOCK_N]
    b_qx = column_bias(QX, o_n, m_n, LOGQ)  # [BLOCK_N] q₂ of the X columns (0, unread, without LOGQ)
    b_qy = column_bias(QY, o_n, m_n, LOGQ)  # [BLOCK_N] q₂ of the Y columns
    b_xt = tl.trans(b_x)  # [BLOCK_D, BLOCK_N]
    b_yt = tl.trans(b_y)  # [BLOCK_D, BLOCK_N]

    b_dx = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dy = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)

    b_bit = column_bits(BLOCK_N)  # [BLOCK_N] each column's bit in its word (MASK_BITS)

    row_start = i_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for k0 in range(row_start, row_end, BLOCK_M):
        o_m = k0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        m_m = o_m < row_end
        p_row = o_m.to(tl.int64)[:, None] * D + o_d[None, :]
        m_row = m_m[:, None] & m_d[None, :]
        b_u = tl.load(U + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
        b_i = tl.load(I + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
        b_user = tl.load(users + o_m, mask=m_m, other=0)  # [BLOCK_M]
        b_item = tl.load(items + o_m, mask=m_m, other=0)  # [BLOCK_M]
        # lse in base 2 (rows out of range: −inf, g = 0: all their weights are 0)
        b_lse_a = (tl.load(LSE + o_m, mask=m_m, other=float("-inf")))[:, None]  # [BLOCK_M, 1]
        b_lse_b = (tl.load(LSE + M + o_m, mask=m_m, other=float("-inf")))[:, None]
        b_lse_c = (tl.load(LSE + 2 * M + o_m, mask=m_m, other=float("-inf")))[:, None]
        b_lse_e = (tl.load(LSE + 3 * M + o_m, mask=m_m, other=float("-inf")))[:, None]
        b_g_a = tl.load(G + o_m, mask=m_m, other=0.0)[:, None]  # [BLOCK_M, 1]
        b_g_b = tl.load(G + M + o_m, mask=m_m, other=0.0)[:, None]
        b_g_c = tl.load(G + 2 * M + o_m, mask=m_m, other=0.0)[:, None]
        b_g_e = tl.load(G + 3 * M + o_m, mask=m_m, other=0.0)[:, None]
        b_ru = inv_norms(RU, o_m, m_m, COSINE)  # [BLOCK_M]
        b_ri = inv_norms(RI, o_m, m_m, COSINE)  # [BLOCK_M]
        # per-row factors f of the base-2 scores, as in the forward
        b_fu = (b_ru * scale2 + tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype))[:, None]  # [BLOCK_M, 1]
        b_fi = (b_ri * scale2 + tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype))[:, None]  # [BLOCK_M, 1]
        # the tiles in the forward's orientation [rows, columns], so that the recomputed
        # scores are the forward's to the bit and p sums to 1 with the forward's lse
        if MASK_BITS:  # the masks from the batch's bits (negative_mask.py): this program's columns of rows o_m
            p_bits = o_m.to(tl.int64) * W  # [BLOCK_M] the rows' first words
            b_lo_i, b_hi_i = tile_bits(BI + p_bits, m_m, i_n * BLOCK_N, NP, BLOCK_N)  # [BLOCK_M] bits of Tᴵ
            b_lo_u, b_hi_u = tile_bits(BU + p_bits, m_m, i_n * BLOCK_N, NP, BLOCK_N)  # [BLOCK_M] bits of Tᵁ
            m_item = bits_mask(b_lo_i, b_hi_i, b_bit, BLOCK_N)  # [BLOCK_M, BLOCK_N]
            m_user = bits_mask(b_lo_u, b_hi_u, b_bit, BLOCK_N)
        else:
            m_neg = own_block_excluded(((row_offset + o_m) * P)[:, None], o_n[None, :],
                                       m_m[:, None] & m_n[None, :], P)  # [BLOCK_M, BLOCK_N]
            # Tᴵ (masks A, E); Tᵁ (masks B, C) here too for FMA products (fp32/fp64) and d > 64, else
            # just before its two tiles: what ptxas allocates best (bench/sass_report.py: fewest spills)
            m_item = true_item_mask(m_neg, b_user[:, None], b_item[:, None], b_xid[None, :],
                                    index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)  # [BLOCK_M, BLOCK_N]
            if b_x.dtype.is_fp32() or b_x.dtype.is_fp64() or BLOCK_D > 64:
                m_user = true_user_mask(m_neg, b_user[:, None], b_item[:, None], b_yid[None, :],
                                        index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)

        # w_A = g_A·p_A with A = U Xᵀ / τ;  w_E = g_E·p_E with E = I Xᵀ / τ   (p = 2^(t·f − lse₂),
        # LOGQ: 2^(t·f − q₂ − lse₂); EXTRA: w_E on the pool columns only)
        b_t = column_scaled(score_dot(b_u, b_xt, UPCAST), b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w_a = scale_weights(weights2(b_t, b_fu, b_qx, b_lse_a, b_g_a, m_item, LOGQ), b_ru, 0, COSINE)
        b_t = column_scaled(score_dot(b_i, b_xt, UPCAST), b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w_e = weights2(b_t, b_fi, b_qx, b_lse_e, b_g_e, pool_columns(m_item, o_n, n_pool, EXTRA), LOGQ)
        b_w_e = scale_weights(b_w_e, b_ri, 0, COSINE)
        # dX += w_Aᵀ U + w_Eᵀ I   (for cosine: dX̂, the weights carry the rows' inverse norms)
        b_dx += score_dot(tl.trans(b_w_a.to(b_u.dtype)), b_u, UPCAST)  # [BLOCK_N, BLOCK_D]
        b_dx += score_dot(tl.trans(b_w_e.to(b_i.dtype)), b_i, UPCAST)

        if not (MASK_BITS or b_x.dtype.is_fp32() or b_x.dtype.is_fp64() or BLOCK_D > 64):
            m_user = true_user_mask(m_neg, b_user[:, None], b_item[:, None], b_yid[None, :],
                                    index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)
        # w_B = g_B·p_B with B = I Yᵀ / τ;  w_C = g_C·p_C with C = U Yᵀ / τ   (EXTRA: w_C on pool columns only)
        b_t = column_scaled(score_dot(b_i, b_yt, UPCAST), b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w_b = scale_weights(weights2(b_t, b_fi, b_qy, b_lse_b, b_g_b, m_user, LOGQ), b_ri, 0, COSINE)
        b_t = column_scaled(score_dot(b_u, b_yt, UPCAST), b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_w_c = weights2(b_t, b_fu, b_qy, b_lse_c, b_g_c, pool_columns(m_user, o_n, n_pool, EXTRA), LOGQ)
        b_w_c = scale_weights(b_w_c, b_ru, 0, COSINE)
        # dY += w_Bᵀ I + w_Cᵀ U
        b_dy += score_dot(tl.trans(b_w_b.to(b_i.dtype)), b_i, UPCAST)  # [BLOCK_N, BLOCK_D]
        b_dy += score_dot(tl.trans(b_w_c.to(b_u.dtype)), b_u, UPCAST)

    # the own-block columns: column j is own column p = j mod P of row k = j // P − row_offset,
    # added by the split whose rows hold k (an extra column, j ≥ n_pool = N·P, has k ≥ N −
    # row_offset ≥ M: never held, so its own-block terms are masked off and GOWN is not read)
    # dX[j] += g_ownA[k, p] U_k + g_ownE[k, p] I_k;  dY[j] += g_ownB[k, p] I_k + g_ownC[k, p] U_k
    o_k = b_owner - row_offset  # [BLOCK_N]
    m_k = m_n & (o_k >= row_start) & (o_k < row_end)
    p_k = o_k.to(tl.int64)[:, None] * D + o_d[None, :]
    m_kd = m_k[:, None] & m_d[None, :]
    b_uk = tl.load(U + p_k, mask=m_kd, other=0.0)  # [BLOCK_N, BLOCK_D]
    b_ik = tl.load(I + p_k, mask=m_kd, other=0.0)  # [BLOCK_N, BLOCK_D]
    b_uk = normalized(b_uk, inv_norms(RU, o_k, m_k, COSINE), b_dx.dtype, COSINE)
    b_ik = normalized(b_ik, inv_norms(RI, o_k, m_k, COSINE), b_dx.dtype, COSINE)
    # GOWN entry k·P + p of column j is j − row_offset·P
    b_go_a, b_go_b, b_go_c, b_go_e = load_own_grads(GOWN + (o_n.to(tl.int64) - row_offset * P), M * P, m_k)
    b_dx += b_go_a * b_uk + b_go_e * b_ik
    b_dy += b_go_b * b_ik + b_go_c * b_uk

    # cosine: from the normalised columns' gradients to the raw ones
    b_dx = unnormalized_grad(b_dx, b_x, RX, o_n, m_n, COSINE)
    b_dy = unnormalized_grad(b_dy, b_y, RY, o_n, m_n, COSINE)

    # dX, dY = (1/τ)·(accumulated sums), into this split's slice
    p_out = i_s.to(tl.int64) * NP * D + p_col
    tl.store(DX + p_out, b_dx * inv_tau, mask=m_col)
    tl.store(DY + p_out, b_dy * inv_tau, mask=m_col)
