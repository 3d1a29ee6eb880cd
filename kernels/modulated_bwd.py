"""Backward of the modulated negative statistics: gradients of every operand and of W₃.

For one modulated family (A, or B), upstream g ``[M]`` of its lse and the forward's lse, the
weight of pair (k, j) is w = ∂loss/∂f = (g[k]/τ)·exp(f[k, j]/τ − lse[k]) on the family's
true negatives (0 elsewhere, and on rows whose lse is −inf). With a = m⊙v_r and c = m⊙v_c:

    ∂f/∂a = c,  ∂f/∂c = a                                                (dot)
    ∂f/∂a = γ·c − f·α_a·a,  ∂f/∂c = γ·a − f·α_c·c                        (NORMALIZE)
            γ = 1/(‖a‖'‖c‖'),  ‖a‖' = max(‖a‖, 1e-12),  α_a = 1/‖a‖² where ‖a‖ > 1e-12, else 0

    ∂/∂v_r = w·m ⊙ ∂f/∂a                 ∂/∂v_c = w·m ⊙ ∂f/∂c
    δ = ∂/∂pre = w·m(1 − m) ⊙ (v_r ⊙ ∂f/∂a + v_c ⊙ ∂f/∂c)        pre = h_r + h_c + W₃(e_r ⊙ e_c)
    dh_r[k] = Σ_j δ[k, j]                dh_c[j] = Σ_k δ[k, j]
    de_r[k] = Σ_j (δ W₃)[k, j] ⊙ e_c[j]  de_c[j] = Σ_k (δ W₃)[k, j] ⊙ e_r[k]
    dW₃ = Σ_{k, j} δ[k, j] (e_r[k] ⊙ e_c[j])ᵀ

The host turns dh into the gradients of W₁, W₂, b and of the factors e through h = W e (+ b)
(per-entity products), so only W₃'s gradient is a reduction over pairs: each program of the
row-parallel kernel writes its partial dW₃ ``[D, D]`` into its own slot of a
``[programs, D, D]`` buffer, summed by the host in a fixed order (deterministic, no atomics).
As in the forward, the products run as ``tl.dot``, CHUNK columns c' a step: in the column
kernel t = δ W₃[:, chunk] ``[BLOCK_M·BLOCK_N, CHUNK]`` on the flattened pair tile gives those
columns of de_c (Σ_k t e_r[k, chunk], :func:`factor_grads_cols`); in the row kernel one product
X_k = δ_kᵀ e_c[:, chunk] per row k gives those of de_r (Σ_c W₃[c, chunk] X_k[c, chunk]) and of
dW₃ (Σ_k e_r[k, chunk] X_k) (:func:`factor_grads_rows`).
C and E are plain dot products of the c operands (as ``negative_stats_bwd.py``).

The two options of the forward (``modulated_fwd.py``; hdccf_triton/LOSS.md, "Sampling-bias
correction" and "Mixed negatives"), the same constexprs: with ``LOGQ`` the weights are those of
the corrected scores, w = (g[k]/τ)·exp(f[k, j]/τ − ℓ_j − lse[k]) (ℓ = ℓᴵ for A and E, ℓᵁ for B
and C; a constant: ∂(s − ℓ)/∂s = 1, so everything else above is unchanged); with ``EXTRA`` the
weights of C and E are 0 on the extra columns j ≥ n_pool (A and B weigh them like pool
columns). The row-parallel kernel splits the columns as the forward (:func:`column_split`);
the column-parallel kernel's column blocks may straddle n_pool (the masks are per column).

Two kernels, like the dot/cosine backward: row-parallel (gradients of the row operands and
dW₃; each program owns BLOCK_M rows and sweeps its split of the columns) and column-parallel
(gradients of the column operands). Both recompute the tiles in the forward's orientation
[rows, columns] with the forward's helpers, so the recomputed scores equal the forward's to
the bit and the weights are consistent with its lse. Operand slots: see ``modulated_fwd.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .membership import true_negative_masks
from .modulated_fwd import (
    CHUNK, NORM_EPS, column_corrections, corrected, load_slot, modulated_score, modulation_tile,
)
from .negative_stats_fwd import column_split, pool_columns
from .negative_stats_bwd import grad_weights

__all__ = ["modulated_stats_bwd_rows_kernel", "modulated_stats_bwd_cols_kernel",
           "modulated_pair_grads", "factor_grads_rows", "factor_grads_cols"]

_add = tl.standard._sum_combine


@triton.jit
def modulated_pair_grads(
    R, slot_r, o_r, m_r, n_rows,  # the rows' factors e_r (slot of R [8, n_rows, D])
    C, slot_c, o_c, m_c, n_cols,  # the columns' factors e_c (slot of C [8, n_cols, D])
    W3, o_d, m_d, D,
    b_vr, b_hr,  # [BLOCK_M, BLOCK_D] row vector v_r and pre-activation h_r
    b_vc, b_hc,  # [BLOCK_N, BLOCK_D] the columns'
    b_lc,  # [BLOCK_N] the columns' corrections ℓ (read with LOGQ only)
    b_lse, b_g,  # [BLOCK_M, 1] the family's lse and upstream gradient
    m_s,  # [BLOCK_M, BLOCK_N] the family's true negatives
    inv_tau,
    NORMALIZE: tl.constexpr, LOGQ: tl.constexpr,
):
    """Per-pair gradient pieces of one modulated family on a tile (module doc), weighted by
    w = (g/τ)·exp(f/τ − ℓ − lse) on the mask (without ℓ unless ``LOGQ``).

    Returns ∂/∂v_r, ∂/∂v_c and δ = ∂/∂pre as ``[BLOCK_M, BLOCK_N, BLOCK_D]`` tiles, to be
    summed over the columns (row kernel) or the rows (column kernel).
    """
    b_m = modulation_tile(R, slot_r, o_r, m_r, n_rows, C, slot_c, o_c, m_c, n_cols,
                          W3, o_d, m_d, D, b_hr, b_hc)  # [BLOCK_M, BLOCK_N, BLOCK_D]
    b_f = modulated_score(b_m, b_vr, b_vc, NORMALIZE)  # [BLOCK_M, BLOCK_N]
    # w = ∂loss/∂f: the softmax weight on the mask times g, times 1/τ (score = f/τ)
    b_w = grad_weights(corrected(b_f * inv_tau, b_lc, LOGQ), b_lse, b_g, m_s) * inv_tau  # [BLOCK_M, BLOCK_N]

    b_a = b_m * b_vr[:, None, :]  # m ⊙ v_r   [BLOCK_M, BLOCK_N, BLOCK_D]
    b_c = b_m * b_vc[None, :, :]  # m ⊙ v_c
    if NORMALIZE:
        b_na2 = tl.reduce(b_a * b_a, 2, _add)  # ‖a‖²  [BLOCK_M, BLOCK_N]
        b_nc2 = tl.reduce(b_c * b_c, 2, _add)  # ‖c‖²
        b_na = tl.sqrt(b_na2)
        b_nc = tl.sqrt(b_nc2)
        b_gamma = b_w / (tl.maximum(b_na, NORM_EPS) * tl.maximum(b_nc, NORM_EPS))  # w·γ
        # w·f·α: zero where the norm is clamped (the clamp's gradient); the divisor is never 0
        b_alpha_a = tl.where(b_na > NORM_EPS, b_w * b_f / tl.where(b_na2 > 0, b_na2, 1.0), 0.0)
        b_alpha_c = tl.where(b_nc > NORM_EPS, b_w * b_f / tl.where(b_nc2 > 0, b_nc2, 1.0), 0.0)
        b_ga = b_gamma[:, :, None] * b_c - b_alpha_a[:, :, None] * b_a  # w·∂f/∂a
        b_gc = b_gamma[:, :, None] * b_a - b_alpha_c[:, :, None] * b_c  # w·∂f/∂c
    else:
        b_ga = b_w[:, :, None] * b_c  # w·∂f/∂a
        b_gc = b_w[:, :, None] * b_a  # w·∂f/∂c
    b_dvr = b_m * b_ga  # [BLOCK_M, BLOCK_N, BLOCK_D]
    b_dvc = b_m * b_gc
    b_dpre = (b_vr[:, None, :] * b_ga + b_vc[None, :, :] * b_gc) * (b_m * (1.0 - b_m))  # δ
    return b_dvr, b_dvc, b_dpre


@triton.jit
def chunk_operands(k0, o_k, o_ch, W3, o_d, m_d, D, R, slot_r, o_r, m_r, n_rows):
    """What both ``factor_grads_*`` read for the chunk of factor entries [k0, k0 + CHUNK): its
    mask m_k ``[CHUNK]`` (entries below D), its select over the running tiles' chunks
    ``[1, BD / CHUNK, 1]``, W₃[:, chunk] ``[BD, CHUNK]`` and e_r[:, chunk] ``[BM, CHUNK]``."""
    m_k = (k0 + o_k) < D
    m_sel = (o_ch == k0 // CHUNK)[None, :, None]
    b_w = tl.load(W3 + o_d[:, None] * D + (k0 + o_k)[None, :], mask=m_d[:, None] & m_k[None, :], other=0.0)
    b_er = load_slot(R, slot_r, o_r, n_rows, k0 + o_k, D, m_r[:, None] & m_k[None, :])
    return m_k, m_sel, b_w, b_er


@triton.jit
def factor_grads_rows(
    b_dpre,  # [BLOCK_M, BLOCK_N, BLOCK_D] δ
    R, slot_r, o_r, m_r, n_rows, C, slot_c, o_c, m_c, n_cols, W3, o_d, m_d, D,
    b_der,  # [BLOCK_M, BLOCK_D / CHUNK, CHUNK] running de_r, by chunk (reshaped to [BLOCK_M, BLOCK_D] at the end)
    b_dw3,  # [BLOCK_D, BLOCK_D / CHUNK, CHUNK] running dW₃, by chunk of its columns
):
    """de_r += Σ_j (δW₃) ⊙ e_c and dW₃ += Σ_{k,j} δ (e_r ⊙ e_c)ᵀ, ``CHUNK`` columns c' a step,
    both from one product X_k = δ_kᵀ e_c (δ_k ``[BN, D]``: row k's pairs):

        X[k, :, chunk] = δ_kᵀ @ e_c[:, chunk]            (tl.dot batched over k, K = BN)
        de_r[k, chunk] += Σ_c W₃[c, chunk] ⊙ X[k, c, chunk]
        dW₃[:, chunk] += Σ_k e_r[k, chunk] ⊙ X[k, :, chunk]

    (de_r[k, c'] = Σ_j Σ_c δ[k, j, c] W₃[c, c'] e_c[j, c'] = Σ_c W₃[c, c'] X[k, c, c']: the
    column pass's product δW₃ is not needed here.) The product batches over the rows k so that
    its K is BLOCK_N, not BLOCK_M·BLOCK_N (a K = 256 operand does not fit in registers). The
    running tiles are kept by chunk,
    ``[.., BLOCK_D / CHUNK, CHUNK]``, so that a chunk's columns are added with one select over the
    tile (registers cannot be indexed at run time).
    """
    BM: tl.constexpr = b_dpre.shape[0]
    BN: tl.constexpr = b_dpre.shape[1]
    BD: tl.constexpr = b_dpre.shape[2]
    b_dt = tl.permute(b_dpre, (0, 2, 1))  # [BM, BD, BN] δ_kᵀ
    o_k = tl.arange(0, CHUNK)  # [CHUNK]
    o_ch = tl.arange(0, BD // CHUNK)  # [BD / CHUNK]
    for k0 in range(0, D, CHUNK):
        m_k, m_sel, b_w, b_er = chunk_operands(k0, o_k, o_ch, W3, o_d, m_d, D, R, slot_r, o_r, m_r, n_rows)
        b_ec = load_slot(C, slot_c, o_c, n_cols, k0 + o_k, D, m_c[:, None] & m_k[None, :])  # [BN, CHUNK]
        b_x = tl.dot(b_dt, tl.broadcast_to(b_ec[None, :, :], (BM, BN, CHUNK)),
                     input_precision="ieee")  # [BM, BD, CHUNK] δ_kᵀ e_c[:, chunk]
        b_col = tl.reduce(b_x * b_w[None, :, :], 1, _add)  # [BM, CHUNK] de_r[:, chunk]
        b_der = tl.where(m_sel, b_der + b_col[:, None, :], b_der)
        b_g = tl.reduce(b_x * b_er[:, None, :], 0, _add)  # [BD, CHUNK] dW₃[:, chunk]
        b_dw3 = tl.where(m_sel, b_dw3 + b_g[:, None, :], b_dw3)
    return b_der, b_dw3


@triton.jit
def factor_grads_cols(
    b_dpre,  # [BLOCK_M, BLOCK_N, BLOCK_D] δ
    R, slot_r, o_r, m_r, n_rows, W3, o_d, m_d, D,
    b_dec,  # [BLOCK_N, BLOCK_D / CHUNK, CHUNK] running de_c, by chunk
):
    """de_c += Σ_k (δW₃) ⊙ e_r, ``CHUNK`` columns c' a step (as :func:`factor_grads_rows`)."""
    BM: tl.constexpr = b_dpre.shape[0]
    BN: tl.constexpr = b_dpre.shape[1]
    BD: tl.constexpr = b_dpre.shape[2]
    b_d2 = tl.reshape(b_dpre, (BM * BN, BD))  # [BM·BN, BD] δ
    o_k = tl.arange(0, CHUNK)  # [CHUNK]
    o_ch = tl.arange(0, BD // CHUNK)  # [BD / CHUNK]
    for k0 in range(0, D, CHUNK):
        _, m_sel, b_w, b_er = chunk_operands(k0, o_k, o_ch, W3, o_d, m_d, D, R, slot_r, o_r, m_r, n_rows)
        b_t = tl.reshape(tl.dot(b_d2, b_w, input_precision="ieee"), (BM, BN, CHUNK))  # (δW₃)[.., chunk]
        b_col = tl.reduce(b_t * b_er[:, None, :], 0, _add)  # [BN, CHUNK]
        b_dec = tl.where(m_sel, b_dec + b_col[:, None, :], b_dec)
    return b_dec


@triton.jit
def modulated_stats_bwd_rows_kernel(
    R,  # [8, M, D] row operands
    C,  # [8, NP, D] column operands: the n_pool pool columns, then any extra ones (EXTRA)
    W3,  # [D, D]
    users, items,  # [M] anchor ids (int32 or int64)
    x_ids, y_ids,  # [NP] column ids (int32 or int64)
    index, n_keys, num_items,  # D (membership.py)
    scale,  # [4] 1/τ (read here), log2(e)/τ, log2(e), ln 2
    QX, QY,  # [NP] ℓᴵ, ℓᵁ of the columns (read with LOGQ only)
    LSE,  # [4, M] lse_A, lse_B, lse_C, lse_E
    G,  # [4, M] their upstream gradients
    DR,  # [S, 8, M, D] out: partial gradients of the row operands per column split
    DW3,  # [programs, D, D] out: partial dW₃ of program (i_m, i_s) at i_m·S + i_s
    M, NP, D, P, row_offset, cols_per_split,
    n_pool,  # the pool columns N·P; the mixed negatives follow (EXTRA)
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

    o_r = o_m.to(tl.int64)
    m_row = m_m[:, None] & m_d[None, :]
    b_pu = load_slot(R, 0, o_r, M, o_d, D, m_row)  # [BLOCK_M, BLOCK_D]   (e_u: slot 1)
    b_hu = load_slot(R, 2, o_r, M, o_d, D, m_row)
    b_qi = load_slot(R, 3, o_r, M, o_d, D, m_row)  # (e_i: slot 4)
    b_hi = load_slot(R, 5, o_r, M, o_d, D, m_row)
    b_cu = load_slot(R, 6, o_r, M, o_d, D, m_row)
    b_ci = load_slot(R, 7, o_r, M, o_d, D, m_row)
    b_user = tl.load(users + o_m, mask=m_m, other=0)  # [BLOCK_M]
    b_item = tl.load(items + o_m, mask=m_m, other=0)
    b_block = row_offset + o_m
    # rows out of range: lse = −inf and g = 0, so all their weights are 0
    b_lse_a = tl.load(LSE + o_m, mask=m_m, other=float("-inf"))[:, None]  # [BLOCK_M, 1]
    b_lse_b = tl.load(LSE + M + o_m, mask=m_m, other=float("-inf"))[:, None]
    b_lse_c = tl.load(LSE + 2 * M + o_m, mask=m_m, other=float("-inf"))[:, None]
    b_lse_e = tl.load(LSE + 3 * M + o_m, mask=m_m, other=float("-inf"))[:, None]
    b_g_a = tl.load(G + o_m, mask=m_m, other=0.0)[:, None]  # [BLOCK_M, 1]
    b_g_b = tl.load(G + M + o_m, mask=m_m, other=0.0)[:, None]
    b_g_c = tl.load(G + 2 * M + o_m, mask=m_m, other=0.0)[:, None]
    b_g_e = tl.load(G + 3 * M + o_m, mask=m_m, other=0.0)[:, None]

    b_dpu = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_deu = tl.full([BLOCK_M, BLOCK_D // CHUNK, CHUNK], 0.0, dtype=inv_tau.dtype)  # by chunk
    b_dhu = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dqi = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dei = tl.full([BLOCK_M, BLOCK_D // CHUNK, CHUNK], 0.0, dtype=inv_tau.dtype)
    b_dhi = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dcu = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dci = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dw3 = tl.full([BLOCK_D, BLOCK_D // CHUNK, CHUNK], 0.0, dtype=inv_tau.dtype)

    col_start, col_end = column_split(i_s, NP, n_pool, cols_per_split, EXTRA)
    for j0 in range(col_start, col_end, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_n = o_n < col_end
        o_c = o_n.to(tl.int64)
        m_col = m_n[:, None] & m_d[None, :]
        b_qx = load_slot(C, 0, o_c, NP, o_d, D, m_col)  # [BLOCK_N, BLOCK_D]   (e_X: slot 1)
        b_hx = load_slot(C, 2, o_c, NP, o_d, D, m_col)
        b_py = load_slot(C, 3, o_c, NP, o_d, D, m_col)  # (e_Y: slot 4)
        b_hy = load_slot(C, 5, o_c, NP, o_d, D, m_col)
        b_cx = load_slot(C, 6, o_c, NP, o_d, D, m_col)
        b_cy = load_slot(C, 7, o_c, NP, o_d, D, m_col)
        b_xid = tl.load(x_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
        b_yid = tl.load(y_ids + o_n, mask=m_n, other=0)
        b_lx = column_corrections(QX, o_n, m_n, LOGQ)  # [BLOCK_N] ℓᴵ (LOGQ)
        b_ly = column_corrections(QY, o_n, m_n, LOGQ)  # [BLOCK_N] ℓᵁ (LOGQ)
        m_item, m_user = true_negative_masks_rows(
            b_user, b_item, b_block * P, b_xid, b_yid, o_n, m_m, m_n,
            P, index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS,
        )  # [BLOCK_M, BLOCK_N] each

        # A = f(u_k, X_j)/τ: rows (p_u, e_u, h_u), columns (q_X, e_X, h_X), on Tᴵ
        b_dvr, _, b_dpre = modulated_pair_grads(
            R, 1, o_r, m_m, M, C, 1, o_c, m_n, NP, W3, o_d, m_d, D,
            b_pu, b_hu, b_qx, b_hx, b_lx, b_lse_a, b_g_a, m_item, inv_tau, NORMALIZE, LOGQ)
        b_dpu += tl.reduce(b_dvr, 1, _add)  # [BLOCK_M, BLOCK_D]
        b_dhu += tl.reduce(b_dpre, 1, _add)
        b_deu, b_dw3 = factor_grads_rows(
            b_dpre, R, 1, o_r, m_m, M, C, 1, o_c, m_n, NP, W3, o_d, m_d, D, b_deu, b_dw3)

        # B = f(Y_j, i_k)/τ: rows (q_i, e_i, h_i), columns (p_Y, e_Y, h_Y), on Tᵁ
        b_dvr, _, b_dpre = modulated_pair_grads(
            R, 4, o_r, m_m, M, C, 4, o_c, m_n, NP, W3, o_d, m_d, D,
            b_qi, b_hi, b_py, b_hy, b_ly, b_lse_b, b_g_b, m_user, inv_tau, NORMALIZE, LOGQ)
        b_dqi += tl.reduce(b_dvr, 1, _add)
        b_dhi += tl.reduce(b_dpre, 1, _add)
        b_dei, b_dw3 = factor_grads_rows(
            b_dpre, R, 4, o_r, m_m, M, C, 4, o_c, m_n, NP, W3, o_d, m_d, D, b_dei, b_dw3)

        # C = c_u·c_Y/τ on Tᵁ:  dc_u += w_C c_Y;   E = c_i·c_X/τ on Tᴵ:  dc_i += w_E c_X
        # (corrected by ℓ with LOGQ; pool columns only with EXTRA)
        b_s = tl.dot(b_cu, tl.trans(b_cy), input_precision="ieee") * inv_tau  # [BLOCK_M, BLOCK_N]
        b_w = grad_weights(corrected(b_s, b_ly, LOGQ), b_lse_c, b_g_c, pool_columns(m_user, o_n, n_pool, EXTRA))
        b_dcu += tl.dot(b_w, b_cy, input_precision="ieee")  # [BLOCK_M, BLOCK_D]
        b_s = tl.dot(b_ci, tl.trans(b_cx), input_precision="ieee") * inv_tau
        b_w = grad_weights(corrected(b_s, b_lx, LOGQ), b_lse_e, b_g_e, pool_columns(m_item, o_n, n_pool, EXTRA))
        b_dci += tl.dot(b_w, b_cx, input_precision="ieee")

    # this split's slice of DR [S, 8, M, D]: slot s of split i_s is row block i_s·8 + s
    o_out = o_r + i_s.to(tl.int64) * 8 * M
    store_slot(DR, 0, o_out, M, o_d, D, m_row, b_dpu)
    store_slot(DR, 1, o_out, M, o_d, D, m_row, tl.reshape(b_deu, (BLOCK_M, BLOCK_D)))
    store_slot(DR, 2, o_out, M, o_d, D, m_row, b_dhu)
    store_slot(DR, 3, o_out, M, o_d, D, m_row, b_dqi)
    store_slot(DR, 4, o_out, M, o_d, D, m_row, tl.reshape(b_dei, (BLOCK_M, BLOCK_D)))
    store_slot(DR, 5, o_out, M, o_d, D, m_row, b_dhi)
    store_slot(DR, 6, o_out, M, o_d, D, m_row, b_dcu * inv_tau)
    store_slot(DR, 7, o_out, M, o_d, D, m_row, b_dci * inv_tau)
    i_prog = (i_m * tl.num_programs(1) + i_s).to(tl.int64)
    m_w = m_d[:, None] & m_d[None, :]
    tl.store(DW3 + i_prog * D * D + o_d[:, None] * D + o_d[None, :], tl.reshape(b_dw3, (BLOCK_D, BLOCK_D)), mask=m_w)


@triton.jit
def modulated_stats_bwd_cols_kernel(
    R,  # [8, M, D] row operands
    C,  # [8, NP, D] column operands: the n_pool pool columns, then any extra ones (EXTRA)
    W3,  # [D, D]
    users, items,  # [M] anchor ids (int32 or int64)
    x_ids, y_ids,  # [NP] column ids (int32 or int64)
    index, n_keys, num_items,  # D (membership.py)
    scale,  # [4] 1/τ (read here), log2(e)/τ, log2(e), ln 2
    QX, QY,  # [NP] ℓᴵ, ℓᵁ of the columns (read with LOGQ only)
    LSE,  # [4, M]
    G,  # [4, M]
    DC,  # [S, 8, NP, D] out: partial gradients of the column operands per row split
    M, NP, D, P, row_offset, rows_per_split,
    n_pool,  # the pool columns N·P; the mixed negatives follow (EXTRA)
    NORMALIZE: tl.constexpr, DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, LOGQ: tl.constexpr, EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_n = o_n < NP
    m_d = o_d < D
    inv_tau = tl.load(scale)

    # the columns' operands stay in registers for the whole sweep
    o_c = o_n.to(tl.int64)
    m_col = m_n[:, None] & m_d[None, :]
    b_qx = load_slot(C, 0, o_c, NP, o_d, D, m_col)  # [BLOCK_N, BLOCK_D]   (e_X: slot 1)
    b_hx = load_slot(C, 2, o_c, NP, o_d, D, m_col)
    b_py = load_slot(C, 3, o_c, NP, o_d, D, m_col)  # (e_Y: slot 4)
    b_hy = load_slot(C, 5, o_c, NP, o_d, D, m_col)
    b_cx = load_slot(C, 6, o_c, NP, o_d, D, m_col)
    b_cy = load_slot(C, 7, o_c, NP, o_d, D, m_col)
    b_xid = tl.load(x_ids + o_n, mask=m_n, other=0)  # [BLOCK_N]
    b_yid = tl.load(y_ids + o_n, mask=m_n, other=0)
    b_lx = column_corrections(QX, o_n, m_n, LOGQ)  # [BLOCK_N] ℓᴵ (LOGQ)
    b_ly = column_corrections(QY, o_n, m_n, LOGQ)  # [BLOCK_N] ℓᵁ (LOGQ)

    b_dqx = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dex = tl.full([BLOCK_N, BLOCK_D // CHUNK, CHUNK], 0.0, dtype=inv_tau.dtype)  # by chunk
    b_dhx = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dpy = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dey = tl.full([BLOCK_N, BLOCK_D // CHUNK, CHUNK], 0.0, dtype=inv_tau.dtype)
    b_dhy = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dcx = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)
    b_dcy = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=inv_tau.dtype)

    row_start = i_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for k0 in range(row_start, row_end, BLOCK_M):
        o_m = k0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        m_m = o_m < row_end
        o_r = o_m.to(tl.int64)
        m_row = m_m[:, None] & m_d[None, :]
        b_pu = load_slot(R, 0, o_r, M, o_d, D, m_row)  # [BLOCK_M, BLOCK_D]   (e_u: slot 1)
        b_hu = load_slot(R, 2, o_r, M, o_d, D, m_row)
        b_qi = load_slot(R, 3, o_r, M, o_d, D, m_row)  # (e_i: slot 4)
        b_hi = load_slot(R, 5, o_r, M, o_d, D, m_row)
        b_cu = load_slot(R, 6, o_r, M, o_d, D, m_row)
        b_ci = load_slot(R, 7, o_r, M, o_d, D, m_row)
        b_user = tl.load(users + o_m, mask=m_m, other=0)  # [BLOCK_M]
        b_item = tl.load(items + o_m, mask=m_m, other=0)
        b_lse_a = tl.load(LSE + o_m, mask=m_m, other=float("-inf"))[:, None]  # [BLOCK_M, 1]
        b_lse_b = tl.load(LSE + M + o_m, mask=m_m, other=float("-inf"))[:, None]
        b_lse_c = tl.load(LSE + 2 * M + o_m, mask=m_m, other=float("-inf"))[:, None]
        b_lse_e = tl.load(LSE + 3 * M + o_m, mask=m_m, other=float("-inf"))[:, None]
        b_g_a = tl.load(G + o_m, mask=m_m, other=0.0)[:, None]  # [BLOCK_M, 1]
        b_g_b = tl.load(G + M + o_m, mask=m_m, other=0.0)[:, None]
        b_g_c = tl.load(G + 2 * M + o_m, mask=m_m, other=0.0)[:, None]
        b_g_e = tl.load(G + 3 * M + o_m, mask=m_m, other=0.0)[:, None]
        # the tiles in the forward's orientation [rows, columns]
        m_item, m_user = true_negative_masks_rows(
            b_user, b_item, (row_offset + o_m) * P, b_xid, b_yid, o_n, m_m, m_n,
            P, index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS,
        )  # [BLOCK_M, BLOCK_N] each

        # A: columns (q_X, e_X, h_X)
        _, b_dvc, b_dpre = modulated_pair_grads(
            R, 1, o_r, m_m, M, C, 1, o_c, m_n, NP, W3, o_d, m_d, D,
            b_pu, b_hu, b_qx, b_hx, b_lx, b_lse_a, b_g_a, m_item, inv_tau, NORMALIZE, LOGQ)
        b_dqx += tl.reduce(b_dvc, 0, _add)  # [BLOCK_N, BLOCK_D]
        b_dhx += tl.reduce(b_dpre, 0, _add)
        b_dex = factor_grads_cols(b_dpre, R, 1, o_r, m_m, M, W3, o_d, m_d, D, b_dex)
        # B: columns (p_Y, e_Y, h_Y)
        _, b_dvc, b_dpre = modulated_pair_grads(
            R, 4, o_r, m_m, M, C, 4, o_c, m_n, NP, W3, o_d, m_d, D,
            b_qi, b_hi, b_py, b_hy, b_ly, b_lse_b, b_g_b, m_user, inv_tau, NORMALIZE, LOGQ)
        b_dpy += tl.reduce(b_dvc, 0, _add)
        b_dhy += tl.reduce(b_dpre, 0, _add)
        b_dey = factor_grads_cols(b_dpre, R, 4, o_r, m_m, M, W3, o_d, m_d, D, b_dey)

        # C = c_u·c_Y/τ:  dc_Y += w_Cᵀ c_u;   E = c_i·c_X/τ:  dc_X += w_Eᵀ c_i
        # (corrected by ℓ with LOGQ; 0 on the extra columns with EXTRA)
        b_s = tl.dot(b_cu, tl.trans(b_cy), input_precision="ieee") * inv_tau  # [BLOCK_M, BLOCK_N]
        b_w = grad_weights(corrected(b_s, b_ly, LOGQ), b_lse_c, b_g_c, pool_columns(m_user, o_n, n_pool, EXTRA))
        b_dcy += tl.dot(tl.trans(b_w), b_cu, input_precision="ieee")  # [BLOCK_N, BLOCK_D]
        b_s = tl.dot(b_ci, tl.trans(b_cx), input_precision="ieee") * inv_tau
        b_w = grad_weights(corrected(b_s, b_lx, LOGQ), b_lse_e, b_g_e, pool_columns(m_item, o_n, n_pool, EXTRA))
        b_dcx += tl.dot(tl.trans(b_w), b_ci, input_precision="ieee")

    o_out = o_c + i_s.to(tl.int64) * 8 * NP
    store_slot(DC, 0, o_out, NP, o_d, D, m_col, b_dqx)
    store_slot(DC, 1, o_out, NP, o_d, D, m_col, tl.reshape(b_dex, (BLOCK_N, BLOCK_D)))
    store_slot(DC, 2, o_out, NP, o_d, D, m_col, b_dhx)
    store_slot(DC, 3, o_out, NP, o_d, D, m_col, b_dpy)
    store_slot(DC, 4, o_out, NP, o_d, D, m_col, tl.reshape(b_dey, (BLOCK_N, BLOCK_D)))
    store_slot(DC, 5, o_out, NP, o_d, D, m_col, b_dhy)
    store_slot(DC, 6, o_out, NP, o_d, D, m_col, b_dcx * inv_tau)
    store_slot(DC, 7, o_out, NP, o_d, D, m_col, b_dcy * inv_tau)


@triton.jit
def store_slot(base, slot, o_r, n_rows, o_d, D, m_2d, b_val):
    """Store ``b_val [BLOCK, BLOCK_D]`` into rows ``o_r`` of slot ``slot`` of an
    ``[.., 8, n_rows, D]`` buffer (``o_r`` already offset to the split's block)."""
    p = (o_r + slot * n_rows)[:, None] * D + o_d[None, :]
    tl.store(base + p, b_val, mask=m_2d)


@triton.jit
def true_negative_masks_rows(
    b_user, b_item, b_first, b_xid, b_yid, o_n, m_m, m_n,
    P, index, n_keys, num_items,
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """``membership.true_negative_masks`` on a [rows, columns] tile from ``[BLOCK_M]`` row
    vectors (ids, first own column (row_offset + k)·P) and ``[BLOCK_N]`` column vectors."""
    return true_negative_masks(
        b_user[:, None], b_item[:, None], b_first[:, None],
        b_xid[None, :], b_yid[None, :], o_n[None, :],
        m_m[:, None] & m_n[None, :],
        P, index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS,
    )
