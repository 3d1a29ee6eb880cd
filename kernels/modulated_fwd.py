"""Forward of the negative statistics with the modulated similarity (eqs. 7-8), fused.

Row k of the batch and column j of the flattened pools score, with g's weight split into the
blocks W₁, W₂, W₃ that multiply e_i, e_u and e_i⊙e_u:

    m[k, j] = sigmoid( h_r[k] + h_c[j] + W₃ (e_r[k] ⊙ e_c[j]) )            [d]
    f[k, j] = Σ_c m_c² v_r[k, c] v_c[j, c]   (cosine of m⊙v_r and m⊙v_c with NORMALIZE)

    A = f(u_k, X_j)/τ:  rows (v, e, h) = (p_u, e_u, W₂e_u + b), columns (q_X, e_X, W₁e_X)
    B = f(Y_j, i_k)/τ:  rows (q_i, e_i, W₁e_i + b), columns (p_Y, e_Y, W₂e_Y)
    C = c_u·c_Y/τ,  E = c_i·c_X/τ   (the p and q halves; normalised by the host for cosine)

The per-entity pre-activations h are computed once by the host ([M, d] and [N·P, d]); only
W₃(e_r ⊙ e_c) is pairwise: a product of the flattened pair tile [BLOCK_M·BLOCK_N, d] with W₃ᵀ
(:func:`modulation_tile`). Each program owns BLOCK_M rows and sweeps the column tiles of its
split with online log-sum-exps (as in flash attention) over the true negatives (masks of
``membership.py``):
lse_A, lse_E over Tᴵ_k, lse_B, lse_C over Tᵁ_k, −inf when empty, and the counts. Nothing of
shape [M, N·P] or [M, N·P, d] exists in memory. Everything runs in the operands' dtype (fp32,
or fp64), which the host has already cast to.

Two options, each a constexpr that leaves the default path's code as it is when off:

* ``LOGQ``, the sampling-bias correction (hdccf_triton/LOSS.md, "Sampling-bias correction"):
  every negative column's score is lowered by the ℓ of its id, read from ``QX [NP]`` (ℓᴵ of
  the item columns, for A and E) and ``QY [NP]`` (ℓᵁ of the user columns, for B and C), in
  natural-log units as the exponentials here (``tl.exp``):

      lse_A[k] = log Σ_{j ∈ Tᴵ_k} exp(A[k, j] − ℓᴵ_j)    lse_E likewise with E
      lse_B[k] = log Σ_{j ∈ Tᵁ_k} exp(B[k, j] − ℓᵁ_j)    lse_C likewise with C

  (the positive and the own blocks are not corrected: they are no column of these sums).
* ``EXTRA``, the mixed negatives (hdccf_triton/LOSS.md, "Mixed negatives"): the columns
  ``[n_pool, NP)`` follow the N·P = ``n_pool`` pool columns, laid out like them, with the same
  false-negative test and no own block (row k's own block [(row_offset + k)·P, +P) lies below
  n_pool, so :func:`membership.own_block_excluded` never excludes them). They enter A and B
  only: the masks of C and E are cut to j < n_pool. No column split straddles n_pool
  (:func:`column_split`), so the counts of the pool splits alone are the auxiliary counts
  |Tᴵ_k|, |Tᵁ_k| over the pool columns, which the host sums apart.

Operand layout (host: ``hdccf_triton.backends.triton_modulated``): rows ``R [8, M, D]`` with slots
0 p_u, 1 e_u, 2 h_u, 3 q_i, 4 e_i, 5 h_i, 6 c_u, 7 c_i; columns ``C [8, NP, D]`` with slots
0 q_X, 1 e_X, 2 h_X, 3 p_Y, 4 e_Y, 5 h_Y, 6 c_X, 7 c_Y (pool columns, then the extra ones);
``W3 [D, D]`` (W3[c, c'] multiplies (e_i⊙e_u)_c' in m_c).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .membership import true_negative_masks
from .negative_stats_fwd import column_split, finish_lse, online_lse_update, pool_columns

__all__ = ["modulated_stats_fwd_kernel", "load_slot", "modulation_tile",
           "modulated_score", "column_corrections", "corrected", "NORM_EPS", "CHUNK"]

# tl.reduce with Triton's own combine functions, not tl.sum (see negative_stats_fwd.py: the
# standard-library jit functions may have been decorated before TRITON_INTERPRET was set)
_add = tl.standard._sum_combine

#: lower clamp of ‖m⊙v‖ under NORMALIZE (as F.normalize and hdccf_triton.similarity)
NORM_EPS = tl.constexpr(1e-12)
#: factor entries per step of the products with W₃ (:func:`modulation_tile`; the backward's
#: ``factor_grads_*`` likewise): 8 keeps every dot operand in registers (sm_90, fp32, d = 64)
CHUNK = tl.constexpr(8)


@triton.jit
def load_slot(base, slot, o_r, n_rows, o_d, D, m_2d):
    """Rows ``o_r`` (int64 [BLOCK]) of slot ``slot`` of a contiguous ``[8, n_rows, D]``
    operand → ``[BLOCK, BLOCK_D]`` (0 outside ``m_2d``)."""
    p = (o_r + slot * n_rows)[:, None] * D + o_d[None, :]  # int64 offsets
    return tl.load(base + p, mask=m_2d, other=0.0)


@triton.jit
def modulation_tile(
    R, slot_r, o_r, m_r, n_rows,  # the rows' factors e_r: slot ``slot_r`` of R [8, n_rows, D]
    C, slot_c, o_c, m_c, n_cols,  # the columns' factors e_c: slot ``slot_c`` of C [8, n_cols, D]
    W3, o_d, m_d, D,
    b_hr, b_hc,  # [BLOCK_M, BLOCK_D], [BLOCK_N, BLOCK_D] pre-activations h_r, h_c
):
    """m ``[BLOCK_M, BLOCK_N, BLOCK_D]``: the modulation of every (row, column) pair of a tile.

        pre[k, j, :] = h_r[k] + h_c[j] + W₃ (e_r[k] ⊙ e_c[j])

    W₃(e_r ⊙ e_c) for all BLOCK_M·BLOCK_N pairs at once is a product ``[BLOCK_M·BLOCK_N, D] @
    W₃ᵀ``, run as ``tl.dot`` over chunks of ``CHUNK`` factor entries c': each step loads
    e_r[:, chunk], e_c[:, chunk] and W₃ᵀ[chunk, :] (L1-resident after the first tile), forms
    the pairs' products ``[BLOCK_M·BLOCK_N, CHUNK]`` and accumulates. The chunking keeps the
    dot's operands small: an unchunked K = D dot holds whole rows of both operands in
    registers, and ptxas then spills most of the kernel (``bench/sass_report.py``).
    """
    BM: tl.constexpr = b_hr.shape[0]
    BN: tl.constexpr = b_hc.shape[0]
    BD: tl.constexpr = b_hr.shape[1]
    o_k = tl.arange(0, CHUNK)  # [CHUNK]
    b_pre = tl.full((BM * BN, BD), 0.0, dtype=b_hr.dtype)
    for k0 in range(0, D, CHUNK):
        m_k = (k0 + o_k) < D
        b_er = load_slot(R, slot_r, o_r, n_rows, k0 + o_k, D, m_r[:, None] & m_k[None, :])  # [BM, CHUNK]
        b_ec = load_slot(C, slot_c, o_c, n_cols, k0 + o_k, D, m_c[:, None] & m_k[None, :])  # [BN, CHUNK]
        b_w = tl.load(W3 + o_d[None, :] * D + (k0 + o_k)[:, None],
                      mask=m_k[:, None] & m_d[None, :], other=0.0)  # [CHUNK, BD] W₃ᵀ[chunk, :]
        b_p = tl.reshape(b_er[:, None, :] * b_ec[None, :, :], (BM * BN, CHUNK))  # e_r ⊙ e_c
        b_pre = tl.dot(b_p, b_w, b_pre, input_precision="ieee")  # [BM·BN, BD]
    b_pre = tl.reshape(b_pre, (BM, BN, BD)) + b_hr[:, None, :] + b_hc[None, :, :]
    # sigmoid by hand (tl.sigmoid is a standard-library jit function); exp(−pre) = inf gives 0
    return 1.0 / (1.0 + tl.exp(-b_pre))


@triton.jit
def modulated_score(b_m, b_vr, b_vc, NORMALIZE: tl.constexpr):
    """f = (m⊙v_r)·(m⊙v_c) per pair, or its cosine (norms clamped at 1e-12): ``[BLOCK_M, BLOCK_N]``.

    b_m: ``[BLOCK_M, BLOCK_N, BLOCK_D]``; b_vr: ``[BLOCK_M, BLOCK_D]``; b_vc: ``[BLOCK_N, BLOCK_D]``.
    """
    b_a = b_m * b_vr[:, None, :]  # m ⊙ v_r   [BLOCK_M, BLOCK_N, BLOCK_D]
    b_c = b_m * b_vc[None, :, :]  # m ⊙ v_c
    b_f = tl.reduce(b_a * b_c, 2, _add)  # [BLOCK_M, BLOCK_N]
    if NORMALIZE:
        b_na = tl.maximum(tl.sqrt(tl.reduce(b_a * b_a, 2, _add)), NORM_EPS)
        b_nc = tl.maximum(tl.sqrt(tl.reduce(b_c * b_c, 2, _add)), NORM_EPS)
        b_f = b_f / (b_na * b_nc)
    return b_f


@triton.jit
def column_corrections(Q, o_n, m_n, LOGQ: tl.constexpr):
    """ℓ ``[BLOCK_N]`` of the columns ``o_n`` (0 off ``m_n``) from ``Q [NP]``; without
    ``LOGQ`` nothing is read, and the caller does not use the result."""
    if LOGQ:
        b_l = tl.load(Q + o_n, mask=m_n, other=0.0)
    else:
        b_l = o_n  # a placeholder, never read
    return b_l


@triton.jit
def corrected(b_s, b_l, LOGQ: tl.constexpr):
    """The corrected scores s − ℓ of a ``[BLOCK_M, BLOCK_N]`` tile (ℓ ``[BLOCK_N]`` of its
    columns) with ``LOGQ``; else s as it is."""
    if LOGQ:
        b_s = b_s - b_l[None, :]
    return b_s


@triton.jit
def modulated_stats_fwd_kernel(
    R,  # [8, M, D] row operands (module doc)
    C,  # [8, NP, D] column operands: the n_pool pool columns, then any extra ones (EXTRA)
    W3,  # [D, D] the pair block of g's weight
    users, items,  # [M] anchor ids (int32 or int64)
    x_ids, y_ids,  # [NP] column ids (int32 or int64)
    index, n_keys, num_items,  # D, the training pairs (membership.py)
    scale,  # [4] 1/τ (read here), log2(e)/τ, log2(e), ln 2 in the operands' dtype
    QX, QY,  # [NP] ℓᴵ, ℓᵁ of the columns, in the operands' dtype (read with LOGQ only)
    LSE,  # [S, 4, M] out: partial log-sums of A, B, C, E per column split
    CNT,  # [S, 2, M] out: int32 partial |Tᴵ|, |Tᵁ| per column split
    M, NP, D, P, row_offset, cols_per_split,
    n_pool,  # the pool columns N·P; columns n_pool .. NP − 1 are the mixed negatives (EXTRA)
    NORMALIZE: tl.constexpr, DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, LOGQ: tl.constexpr, EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_m = o_m < M
    m_d = o_d < D
    inv_tau = tl.load(scale)

    # the rows' operands and W₃ᵀ stay in registers for the whole sweep
    o_r = o_m.to(tl.int64)
    m_row = m_m[:, None] & m_d[None, :]
    b_pu = load_slot(R, 0, o_r, M, o_d, D, m_row)  # [BLOCK_M, BLOCK_D] p_u
    b_hu = load_slot(R, 2, o_r, M, o_d, D, m_row)  # W₂e_u + b   (e_u: slot 1, read by column)
    b_qi = load_slot(R, 3, o_r, M, o_d, D, m_row)  # q_i
    b_hi = load_slot(R, 5, o_r, M, o_d, D, m_row)  # W₁e_i + b   (e_i: slot 4)
    b_cu = load_slot(R, 6, o_r, M, o_d, D, m_row)  # p_u as f_uu sees it
    b_ci = load_slot(R, 7, o_r, M, o_d, D, m_row)  # q_i as f_ii sees it
    b_user = tl.load(users + o_m, mask=m_m, other=0)  # [BLOCK_M]
    b_item = tl.load(items + o_m, mask=m_m, other=0)  # [BLOCK_M]
    b_block = row_offset + o_m  # [BLOCK_M] own block of each row

    # running max m and sum l of the four log-sum-exps; counts of Tᴵ and Tᵁ
    b_m_a = tl.full([BLOCK_M], float("-inf"), dtype=inv_tau.dtype)
    b_m_b = tl.full([BLOCK_M], float("-inf"), dtype=inv_tau.dtype)
    b_m_c = tl.full([BLOCK_M], float("-inf"), dtype=inv_tau.dtype)
    b_m_e = tl.full([BLOCK_M], float("-inf"), dtype=inv_tau.dtype)
    b_l_a = tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype)
    b_l_b = tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype)
    b_l_c = tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype)
    b_l_e = tl.full([BLOCK_M], 0.0, dtype=inv_tau.dtype)
    b_n_item = tl.full([BLOCK_M], 0, dtype=tl.int32)
    b_n_user = tl.full([BLOCK_M], 0, dtype=tl.int32)

    col_start, col_end = column_split(i_s, NP, n_pool, cols_per_split, EXTRA)
    for j0 in range(col_start, col_end, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_n = o_n < col_end
        o_c = o_n.to(tl.int64)
        m_col = m_n[:, None] & m_d[None, :]
        b_qx = load_slot(C, 0, o_c, NP, o_d, D, m_col)  # [BLOCK_N, BLOCK_D] q_X
        b_hx = load_slot(C, 2, o_c, NP, o_d, D, m_col)  # W₁e_X   (e_X: slot 1)
        b_py = load_slot(C, 3, o_c, NP, o_d, D, m_col)  # p_Y
        b_hy = load_slot(C, 5, o_c, NP, o_d, D, m_col)  # W₂e_Y   (e_Y: slot 4)
        b_cx = load_slot(C, 6, o_c, NP, o_d, D, m_col)  # q_X as f_ii sees it
        b_cy = load_slot(C, 7, o_c, NP, o_d, D, m_col)  # p_Y as f_uu sees it
        b_xid = tl.load(x_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
        b_yid = tl.load(y_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
        b_lx = column_corrections(QX, o_n, m_n, LOGQ)  # [BLOCK_N] ℓᴵ (LOGQ)
        b_ly = column_corrections(QY, o_n, m_n, LOGQ)  # [BLOCK_N] ℓᵁ (LOGQ)

        # Tᴵ_k ∋ j (masks A, E) and Tᵁ_k ∋ j (masks B, C) on the tile
        m_item, m_user = true_negative_masks(
            b_user[:, None], b_item[:, None], (b_block * P)[:, None],
            b_xid[None, :], b_yid[None, :], o_n[None, :],
            m_m[:, None] & m_n[None, :],
            P, index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS,
        )  # [BLOCK_M, BLOCK_N] each
        b_n_item += tl.reduce(m_item.to(tl.int32), 1, _add)
        b_n_user += tl.reduce(m_user.to(tl.int32), 1, _add)

        # A = f(u_k, X_j)/τ (− ℓᴵ_j): rows e_u (slot 1), columns e_X (slot 1)
        b_mod = modulation_tile(R, 1, o_r, m_m, M, C, 1, o_c, m_n, NP, W3, o_d, m_d, D, b_hu, b_hx)
        b_s = modulated_score(b_mod, b_pu, b_qx, NORMALIZE) * inv_tau  # [BLOCK_M, BLOCK_N]
        b_m_a, b_l_a = online_lse_update(b_m_a, b_l_a, corrected(b_s, b_lx, LOGQ), m_item)
        # B = f(Y_j, i_k)/τ (− ℓᵁ_j): rows e_i (slot 4), columns e_Y (slot 4)
        b_mod = modulation_tile(R, 4, o_r, m_m, M, C, 4, o_c, m_n, NP, W3, o_d, m_d, D, b_hi, b_hy)
        b_s = modulated_score(b_mod, b_qi, b_py, NORMALIZE) * inv_tau  # [BLOCK_M, BLOCK_N]
        b_m_b, b_l_b = online_lse_update(b_m_b, b_l_b, corrected(b_s, b_ly, LOGQ), m_user)
        # C = c_u·c_Y/τ (− ℓᵁ_j), pool columns only
        b_s = tl.dot(b_cu, tl.trans(b_cy), input_precision="ieee") * inv_tau  # [BLOCK_M, BLOCK_N]
        b_m_c, b_l_c = online_lse_update(b_m_c, b_l_c, corrected(b_s, b_ly, LOGQ),
                                         pool_columns(m_user, o_n, n_pool, EXTRA))
        # E = c_i·c_X/τ (− ℓᴵ_j), pool columns only
        b_s = tl.dot(b_ci, tl.trans(b_cx), input_precision="ieee") * inv_tau  # [BLOCK_M, BLOCK_N]
        b_m_e, b_l_e = online_lse_update(b_m_e, b_l_e, corrected(b_s, b_lx, LOGQ),
                                         pool_columns(m_item, o_n, n_pool, EXTRA))

    p_lse = LSE + i_s.to(tl.int64) * 4 * M + o_m
    tl.store(p_lse, finish_lse(b_m_a, b_l_a), mask=m_m)
    tl.store(p_lse + M, finish_lse(b_m_b, b_l_b), mask=m_m)
    tl.store(p_lse + 2 * M, finish_lse(b_m_c, b_l_c), mask=m_m)
    tl.store(p_lse + 3 * M, finish_lse(b_m_e, b_l_e), mask=m_m)
    p_cnt = CNT + i_s.to(tl.int64) * 2 * M + o_m
    tl.store(p_cnt, b_n_item, mask=m_m)
    tl.store(p_cnt + M, b_n_user, mask=m_m)
