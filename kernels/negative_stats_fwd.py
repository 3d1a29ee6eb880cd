"""Forward: every score the loss needs, fused: the per-row log-sum-exps of the four score
matrices over the true negatives, and the scores of the diagonal and of the rows' own blocks.

For row k (own block row_offset + k) and the flattened pools j in [0, N·P):

    A[k, j] = U_k·X_j / τ      B[k, j] = I_k·Y_j / τ      C[k, j] = U_k·Y_j / τ      E[k, j] = I_k·X_j / τ
    lse_A[k] = log Σ_{j ∈ Tᴵ_k} exp A[k, j]      lse_E likewise over Tᴵ_k
    lse_B[k] = log Σ_{j ∈ Tᵁ_k} exp B[k, j]      lse_C likewise over Tᵁ_k
    n_item[k] = |Tᴵ_k|,  n_user[k] = |Tᵁ_k|

(−inf for an empty set; Tᴵ, Tᵁ from :func:`membership.true_negative_masks`), and, with
o(k, p) = (row_offset + k)·P + p the columns of row k's own block,

    s[k] = U_k·I_k / τ
    own_A[k, p] = A[k, o(k, p)]   own_B[k, p] = B[k, o(k, p)]   own_C, own_E likewise

(the own-block scores enter the debiasing and the user–user and item–item terms; computing
them in :func:`own_scores_kernel` keeps the Triton path free of any [M, P, d] temporary).

For cosine similarity (``COSINE``) every dot product is scaled by the inverse norms
r = 1/max(‖e‖, ε) of both sides (:func:`scale_tile`), read from ``RU, RI, RX, RY``.

In :func:`negative_stats_fwd_kernel` each program
owns BLOCK_M rows and streams over the column blocks of its split of the columns, keeping a
running max m and a running sum l per row and matrix (online softmax, as in flash attention):
nothing of shape [M, N·P] exists in memory. The columns may be cut into ``grid[1]`` splits of
``cols_per_split`` columns each (to fill the GPU when M is small); each split writes its own
partial log-sums and counts, which the host merges with a logsumexp / sum over the splits in
a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .membership import true_negative_masks

__all__ = ["negative_stats_fwd_kernel", "score_dot", "online_lse_update", "finish_lse", "load_own_block",
           "own_scores_kernel", "inv_norms", "normalized", "scale_tile"]

# The kernels use Triton builtins only. tl.sum, tl.max and tl.zeros are themselves @triton.jit
# functions of Triton's standard library, decorated when triton is imported; if that import
# happened before TRITON_INTERPRET=1 was set (in a test process that imported triton first),
# the interpreter cannot call them. tl.reduce is a builtin, and with Triton's own combine
# functions it is exactly tl.sum / tl.max when compiled, and the numpy fast path of the
# interpreter (which recognises these two functions).
_add = tl.standard._sum_combine
_maximum = tl.standard._elementwise_max


@triton.jit
def score_dot(b_a, b_b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation (fp64 for fp64 inputs), IEEE fp32 products (no TF32).

    ``UPCAST`` casts the operands to fp32 first: the Triton interpreter cannot multiply
    bfloat16 tiles (triton-lang/triton#11584), and a bf16×bf16 product is exact in fp32, so
    the result equals the GPU's bf16 MMA with fp32 accumulation up to summation order.
    """
    if UPCAST:
        b_a = b_a.to(tl.float32)
        b_b = b_b.to(tl.float32)
    return tl.dot(b_a, b_b, input_precision="ieee")


@triton.jit
def online_lse_update(b_m, b_l, b_s, m_s):
    """One tile of the online log-sum-exp of each row of ``b_s`` over the mask ``m_s``.

    b_m, b_l: ``[BLOCK_M]`` running max and running sum (m = −inf, l = 0 before any
    unmasked entry); b_s: ``[BLOCK_M, BLOCK_N]`` scores; m_s: its mask. Returns (m', l').
    """
    # m' = max(m, max_{j masked in} s_j)
    b_s = tl.where(m_s, b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.reduce(b_s, 1, _maximum))  # [BLOCK_M]
    # shift by m' where finite; a row with nothing yet (m' = −inf) shifts by 0, so that
    # exp(−inf − shift) = 0 and never exp(−inf + inf) = NaN
    b_shift = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # [BLOCK_M]
    # l' = l·exp(m − m') + Σ_j exp(s_j − m')
    b_l = b_l * tl.exp(b_m - b_shift) + tl.reduce(tl.exp(b_s - b_shift[:, None]), 1, _add)
    return b_mn, b_l


@triton.jit
def finish_lse(b_m, b_l):
    """log Σ exp from the running (m, l): m + log l, and −inf where the set is empty (l = 0)."""
    b_log_l = tl.log(tl.where(b_l > 0, b_l, 1.0))
    return tl.where(b_l > 0, b_m + b_log_l, float("-inf"))


@triton.jit
def inv_norms(R, o, m, COSINE: tl.constexpr):
    """|R[o]| (1 off the mask): the inverse norms 1/max(‖e‖, ε) of the embeddings o, for
    cosine (R < 0 marks an ε-clamped row, see :func:`unnormalized_grad`); without cosine,
    nothing is loaded and 1 is returned."""
    if COSINE:
        b_r = tl.abs(tl.load(R + o, mask=m, other=1.0))
    else:
        b_r = 1.0
    return b_r


@triton.jit
def normalized(b_e, b_r, dtype: tl.constexpr, COSINE: tl.constexpr):
    """The rows of ``b_e`` in ``dtype``, times their inverse norms ``b_r`` for cosine."""
    b_e = b_e.to(dtype)
    if COSINE:
        b_e = b_e * b_r[:, None]
    return b_e


@triton.jit
def scale_tile(b_dot, b_row, b_col, COSINE: tl.constexpr):
    """A score tile from its dot products: dot·b_row with b_row = 1/τ, or for cosine
    dot·b_row[k]·b_col[j] with b_row = r_row/τ, b_col = r_col (inverse norms)."""
    if COSINE:
        b_s = b_dot * b_row[:, None] * b_col[None, :]
    else:
        b_s = b_dot * b_row
    return b_s


@triton.jit
def load_own_block(X, Y, b_block, p, P, D, o_d, m_row, dtype: tl.constexpr):
    """Pool column ``b_block·P + p`` of X and of Y for each row, in ``dtype``: two [rows, BLOCK_D]."""
    p_own = (b_block.to(tl.int64) * P + p)[:, None] * D + o_d[None, :]
    b_xo = tl.load(X + p_own, mask=m_row, other=0.0).to(dtype)  # [rows, BLOCK_D]
    b_yo = tl.load(Y + p_own, mask=m_row, other=0.0).to(dtype)  # [rows, BLOCK_D]
    return b_xo, b_yo


@triton.jit
def negative_stats_fwd_kernel(
    U, I,  # [M, D] user and item embeddings of the rows
    X, Y,  # [NP, D] flattened pool items and pool users
    users, items,  # [M] int64 anchor ids
    x_ids, y_ids,  # [NP] int64 pool ids
    index, n_keys, num_items,  # D (bitmap words or sorted keys, see membership.py)
    scale,  # [1] 1/τ in the accumulation dtype
    RU, RI, RX, RY,  # [M], [M], [NP], [NP] inverse norms (read for COSINE only)
    LSE,  # [S, 4, M] out: partial log-sums of A, B, C, E per split
    CNT,  # [S, 2, M] out: int32 partial |Tᴵ|, |Tᵁ| per split
    M, NP, D, P, row_offset, cols_per_split,
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    UPCAST: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_m = o_m < M
    m_d = o_d < D
    inv_tau = tl.load(scale)

    # the rows' embeddings stay in registers for the whole sweep
    p_row = o_m.to(tl.int64)[:, None] * D + o_d[None, :]  # int64: M·D may exceed 2**31
    m_row = m_m[:, None] & m_d[None, :]
    b_u = tl.load(U + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_i = tl.load(I + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_user = tl.load(users + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
    b_item = tl.load(items + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
    b_block = row_offset + o_m  # [BLOCK_M] own block of each row
    # per-row factors of the score tiles: 1/τ, or r/τ for cosine
    b_su = inv_norms(RU, o_m, m_m, COSINE) * inv_tau  # [BLOCK_M] (a scalar without COSINE)
    b_si = inv_norms(RI, o_m, m_m, COSINE) * inv_tau  # [BLOCK_M]

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

    col_start = i_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, NP)
    for j0 in range(col_start, col_end, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_n = o_n < col_end
        p_col = o_n.to(tl.int64)[:, None] * D + o_d[None, :]  # int64: N·P·D may exceed 2**31
        m_col = m_n[:, None] & m_d[None, :]
        b_x = tl.load(X + p_col, mask=m_col, other=0.0)  # [BLOCK_N, BLOCK_D]
        b_y = tl.load(Y + p_col, mask=m_col, other=0.0)  # [BLOCK_N, BLOCK_D]
        b_xid = tl.load(x_ids + o_n, mask=m_n, other=0)  # [BLOCK_N] int64
        b_yid = tl.load(y_ids + o_n, mask=m_n, other=0)  # [BLOCK_N] int64
        b_rx = inv_norms(RX, o_n, m_n, COSINE)  # [BLOCK_N] (1 without COSINE)
        b_ry = inv_norms(RY, o_n, m_n, COSINE)  # [BLOCK_N]

        # Tᴵ_k ∋ j (masks A, E) and Tᵁ_k ∋ j (masks B, C) on the tile
        m_item, m_user = true_negative_masks(
            b_user[:, None], b_item[:, None], b_block[:, None],
            b_xid[None, :], b_yid[None, :], (o_n // P)[None, :],
            m_m[:, None] & m_n[None, :],
            index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS,
        )  # [BLOCK_M, BLOCK_N] each
        b_n_item += tl.reduce(m_item.to(tl.int32), 1, _add)
        b_n_user += tl.reduce(m_user.to(tl.int32), 1, _add)

        # A = U Xᵀ / τ (cosine: scaled by the inverse norms of both sides)
        b_s = scale_tile(score_dot(b_u, tl.trans(b_x), UPCAST), b_su, b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_a, b_l_a = online_lse_update(b_m_a, b_l_a, b_s, m_item)
        # E = I Xᵀ / τ
        b_s = scale_tile(score_dot(b_i, tl.trans(b_x), UPCAST), b_si, b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_e, b_l_e = online_lse_update(b_m_e, b_l_e, b_s, m_item)
        # B = I Yᵀ / τ
        b_s = scale_tile(score_dot(b_i, tl.trans(b_y), UPCAST), b_si, b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_b, b_l_b = online_lse_update(b_m_b, b_l_b, b_s, m_user)
        # C = U Yᵀ / τ
        b_s = scale_tile(score_dot(b_u, tl.trans(b_y), UPCAST), b_su, b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_c, b_l_c = online_lse_update(b_m_c, b_l_c, b_s, m_user)

    b_lse_a = finish_lse(b_m_a, b_l_a)  # [BLOCK_M]
    b_lse_b = finish_lse(b_m_b, b_l_b)  # [BLOCK_M]
    b_lse_c = finish_lse(b_m_c, b_l_c)  # [BLOCK_M]
    b_lse_e = finish_lse(b_m_e, b_l_e)  # [BLOCK_M]
    p_lse = LSE + i_s.to(tl.int64) * 4 * M + o_m
    tl.store(p_lse, b_lse_a, mask=m_m)
    tl.store(p_lse + M, b_lse_b, mask=m_m)
    tl.store(p_lse + 2 * M, b_lse_c, mask=m_m)
    tl.store(p_lse + 3 * M, b_lse_e, mask=m_m)
    p_cnt = CNT + i_s.to(tl.int64) * 2 * M + o_m
    tl.store(p_cnt, b_n_item, mask=m_m)
    tl.store(p_cnt + M, b_n_user, mask=m_m)



@triton.jit
def own_scores_kernel(
    U, I,  # [M, D] user and item embeddings of the rows
    X, Y,  # [NP, D] flattened pool items and pool users
    scale,  # [1] 1/τ in the accumulation dtype
    RU, RI, RX, RY,  # [M], [M], [NP], [NP] inverse norms (read for COSINE only)
    SC,  # [M] out: s (accumulation dtype)
    OWN,  # [4, M, P] out: own_A, own_B, own_C, own_E (accumulation dtype)
    M, D, P, row_offset,
    COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """s and the own-block scores, elementwise in the accumulation dtype (a kernel of its own,
    so that the register pressure of the sweep above stays as it is)."""
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_m = o_m < M
    m_row = m_m[:, None] & (o_d < D)[None, :]
    inv_tau = tl.load(scale)
    p_row = o_m.to(tl.int64)[:, None] * D + o_d[None, :]
    acc = inv_tau.dtype
    b_u = tl.load(U + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_i = tl.load(I + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_u = normalized(b_u, inv_norms(RU, o_m, m_m, COSINE), acc, COSINE)  # [BLOCK_M, BLOCK_D]
    b_i = normalized(b_i, inv_norms(RI, o_m, m_m, COSINE), acc, COSINE)  # [BLOCK_M, BLOCK_D]
    # s[k] = U_k·I_k / τ
    tl.store(SC + o_m, tl.reduce(b_u * b_i, 1, _add) * inv_tau, mask=m_m)
    MP = M * P
    for p in range(0, P):
        # own_A = U·X_o / τ, own_B = I·Y_o / τ, own_C = U·Y_o / τ, own_E = I·X_o / τ
        b_xo, b_yo = load_own_block(X, Y, row_offset + o_m, p, P, D, o_d, m_row, acc)
        o_own = (row_offset + o_m) * P + p  # [BLOCK_M] own columns
        b_xo = normalized(b_xo, inv_norms(RX, o_own, m_m, COSINE), acc, COSINE)
        b_yo = normalized(b_yo, inv_norms(RY, o_own, m_m, COSINE), acc, COSINE)
        p_own = OWN + o_m.to(tl.int64) * P + p  # [BLOCK_M]
        tl.store(p_own, tl.reduce(b_u * b_xo, 1, _add) * inv_tau, mask=m_m)
        tl.store(p_own + MP, tl.reduce(b_i * b_yo, 1, _add) * inv_tau, mask=m_m)
        tl.store(p_own + 2 * MP, tl.reduce(b_u * b_yo, 1, _add) * inv_tau, mask=m_m)
        tl.store(p_own + 3 * MP, tl.reduce(b_i * b_xo, 1, _add) * inv_tau, mask=m_m)
