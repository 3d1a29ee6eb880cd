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

Two options, each a constexpr (off, the generated code is that of the plain loss):

* ``LOGQ``, the sampling-bias correction (hdccf_triton/LOSS.md, "Sampling-bias correction"):
  every negative column's score is lowered by the correction ℓ of its id in every sum over
  negatives, A[k, j] − ℓᴵ(X_j), E[k, j] − ℓᴵ(X_j), B[k, j] − ℓᵁ(Y_j), C[k, j] − ℓᵁ(Y_j),
  so that lse_A[k] = log Σ_{j ∈ Tᴵ_k} exp(A[k, j] − ℓᴵ_j) and so on; s and the own blocks
  are not corrected (the own columns are never in Tᴵ, Tᵁ). The kernels read the per-column
  corrections in base 2, q₂ = ℓ·log2(e) (``QX``, ``QY`` ``[C]``, computed on the host in
  float64): the base-2 score is s₂ = t·f − q₂[j], one FFMA (:func:`online_lse2_update_biased`).
* ``EXTRA``, mixed negatives (hdccf_triton/LOSS.md, "Mixed negatives"): B′ extra columns
  follow the N·P pool columns, j in [n_pool, C) with n_pool = N·P, C = N·P + B′, in X, Y and
  their ids. They belong to no own block (j − first_k ≥ P for every row), take the same
  false-negative test, and enter A and B only: the masks of C and E are cut to j < n_pool.
  The column splits never straddle n_pool (pool splits cover [0, n_pool), then extra splits
  [n_pool, C)), so that the host gets n_item, n_user over all columns (A, B) from the sum over
  every split and n_item_aux, n_user_aux over the pool columns (C, E) from the pool splits.

``MASK_BITS`` (the default where memory allows, ``triton_dot.uses_mask_bits``): Tᴵ and Tᵁ are
read from bits computed once per batch by ``negative_mask.py``, which also counts them; the
sweep then tests one bit per pair and counts nothing (the same masks: the same results).

In :func:`negative_stats_fwd_kernel` each program
owns BLOCK_M rows and streams over the column blocks of its split of the columns, keeping a
running max m per row and matrix and running sums l (online softmax, as in flash attention):
nothing of shape [M, N·P] exists in memory. As in flash attention the exponentials are base 2:
with t = U_k·X_j (times r_X[j] for cosine) and the per-row factor f_k = log2(e)/τ (times r_U[k]),
s·log2(e) = t·f, so exp(s − m) = 2^(t·f − m₂) is one FFMA and one ``MUFU.EX2`` (``tl.exp`` costs
three FMULs, an FSETP and the MUFU); the kernel writes lse₂ = lse·log2(e), which the backward
reads as it is and the host converts (in float64) for the loss. The sums l and the two counts
are kept per tile element (tile-shaped accumulators, one FFMA or integer add per element) and
reduced once after the sweep; only the row max is reduced per tile. The columns may be cut into ``grid[1]`` splits of
``cols_per_split`` columns each (to fill the GPU when M is small); each split writes its own
partial log-sums and counts, which the host merges with a logsumexp / sum over the splits in
a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .membership import own_block_excluded, true_item_mask, true_user_mask
from .negative_mask import bits_mask, column_bits, tile_bits

__all__ = ["negative_stats_fwd_kernel", "score_dot", "online_lse_update", "finish_lse", "online_lse2_update",
           "online_lse2_update_biased", "lse2_update", "finish_lse2", "load_own_block", "own_scores_kernel",
           "inv_norms", "column_bias", "column_split", "pool_columns", "normalized", "scale_tile", "column_scaled",
           "SCALE_INV_TAU", "SCALE_LOG2E_TAU", "SCALE_LOG2E", "SCALE_LN2"]

# The kernels use Triton builtins only. tl.sum, tl.max and tl.zeros are themselves @triton.jit
# functions of Triton's standard library, decorated when triton is imported; if that import
# happened before TRITON_INTERPRET=1 was set (in a test process that imported triton first),
# the interpreter cannot call them. tl.reduce is a builtin, and with Triton's own combine
# functions it is exactly tl.sum / tl.max when compiled, and the numpy fast path of the
# interpreter (which recognises these two functions).
_add = tl.standard._sum_combine
_maximum = tl.standard._elementwise_max

# The ``scale`` argument holds four constants in the accumulation dtype, computed on the host in
# float64 (a Python float in a kernel would be an fp32 constant, too coarse for fp64 inputs):
SCALE_INV_TAU = tl.constexpr(0)  # 1/τ
SCALE_LOG2E_TAU = tl.constexpr(1)  # log2(e)/τ: scores in base 2, so that exp is one exp2 (MUFU.EX2)
SCALE_LOG2E = tl.constexpr(2)  # log2(e)
SCALE_LN2 = tl.constexpr(3)  # ln 2


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
def online_lse2_update(b_m, b_l, b_t, b_f, m_s):
    """One tile of the online log-sum-exp in base 2, with the row sums kept per element.

    The tile's scores in base 2 are s₂[k, j] = t[k, j]·f[k] (s₂ = s·log2 e), with f > 0 a
    per-row factor ``[BLOCK_M]`` (log2(e)/τ, times r_k for cosine). b_m: ``[BLOCK_M]`` running
    max of s₂ (−inf before any unmasked entry); b_l: ``[BLOCK_M, BLOCK_N]`` running sums, one
    per tile element (reduced once, after the sweep, by :func:`finish_lse2`). Returns (m', l').

        m' = max(m, f·max_{j ∈ mask} t_j)          (f > 0: the max of the products, exactly)
        l' = l·2^(m − m') + 2^(t·f − m')            (0 off the mask: 2^(−inf) = 0)
    """
    b_t = tl.where(m_s, b_t, float("-inf"))  # [BLOCK_M, BLOCK_N]
    b_mn = tl.maximum(b_m, tl.reduce(b_t, 1, _maximum) * b_f)  # [BLOCK_M]
    # a row with nothing yet (m' = −inf) shifts by 0: 2^(−inf − 0) = 0, never 2^(−inf + inf)
    b_shift = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # [BLOCK_M]
    b_alpha = tl.math.exp2(b_m - b_shift)  # [BLOCK_M] rescale of the old sums
    b_l = b_l * b_alpha[:, None] + tl.math.exp2(b_t * b_f[:, None] - b_shift[:, None])  # [BLOCK_M, BLOCK_N]
    return b_mn, b_l


@triton.jit
def online_lse2_update_biased(b_m, b_l, b_t, b_f, b_q, m_s):
    """:func:`online_lse2_update` of corrected scores (the sampling-bias correction): the base-2
    scores are s₂[k, j] = t[k, j]·f[k] − q₂[j] (one FFMA), q₂ = ℓ·log2(e) ``[BLOCK_N]`` the
    columns' corrections. The max is taken over s₂ itself (the correction breaks the shortcut
    max(t)·f of the plain update). Returns (m', l').

        m' = max(m, max_{j ∈ mask} s₂_j)
        l' = l·2^(m − m') + 2^(s₂ − m')            (0 off the mask)
    """
    b_s = tl.where(m_s, b_t * b_f[:, None] - b_q[None, :], float("-inf"))  # [BLOCK_M, BLOCK_N] s₂
    b_mn = tl.maximum(b_m, tl.reduce(b_s, 1, _maximum))  # [BLOCK_M]
    # a row with nothing yet (m' = −inf) shifts by 0: 2^(−inf − 0) = 0, never 2^(−inf + inf)
    b_shift = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # [BLOCK_M]
    b_alpha = tl.math.exp2(b_m - b_shift)  # [BLOCK_M] rescale of the old sums
    b_l = b_l * b_alpha[:, None] + tl.math.exp2(b_s - b_shift[:, None])  # [BLOCK_M, BLOCK_N]
    return b_mn, b_l


@triton.jit
def lse2_update(b_m, b_l, b_t, b_f, b_q, m_s, LOGQ: tl.constexpr):
    """One tile of the base-2 online log-sum-exp: :func:`online_lse2_update_biased` with the
    columns' corrections ``b_q`` under ``LOGQ``, else :func:`online_lse2_update` (``b_q``
    unused)."""
    if LOGQ:
        b_m, b_l = online_lse2_update_biased(b_m, b_l, b_t, b_f, b_q, m_s)
    else:
        b_m, b_l = online_lse2_update(b_m, b_l, b_t, b_f, m_s)
    return b_m, b_l


@triton.jit
def finish_lse2(b_m, b_l):
    """log2 Σ 2^s₂ (the base-2 log-sum-exp lse₂ = lse·log2 e) from the running max ``b_m
    [BLOCK_M]`` and the per-element sums ``b_l [BLOCK_M, BLOCK_N]``: m + log2 l with
    l = Σ_j l[:, j]; −inf where l = 0. The backward reads lse₂ as it is (its weights
    2^(t·f − lse₂) are then consistent with these sums to the rounding of one addition)."""
    b_sum = tl.reduce(b_l, 1, _add)  # [BLOCK_M]
    b_log_l = tl.math.log2(tl.where(b_sum > 0, b_sum, 1.0))
    return tl.where(b_sum > 0, b_m + b_log_l, float("-inf"))


@triton.jit
def column_scaled(b_dot, b_col, COSINE: tl.constexpr):
    """t = dot, or dot·r_col[j] for cosine (the column factor; the row factor goes to f)."""
    if COSINE:
        b_dot = b_dot * b_col[None, :]
    return b_dot


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
def column_bias(Q, o, m, LOGQ: tl.constexpr):
    """Q[o] (0 off the mask): the columns' base-2 corrections q₂ = ℓ·log2(e) under ``LOGQ``;
    without it nothing is loaded and 0 is returned (never read)."""
    if LOGQ:
        b_q = tl.load(Q + o, mask=m, other=0.0)
    else:
        b_q = 0.0
    return b_q


@triton.jit
def column_split(i_s, NP, n_pool, cols_per_split, EXTRA: tl.constexpr):
    """The columns ``[col_start, col_end)`` of column split ``i_s`` (forward, row-parallel
    backward).

    Without ``EXTRA``: consecutive splits of ``cols_per_split`` columns over [0, NP). With
    ``EXTRA`` no split straddles ``n_pool``: splits 0 .. S_pool − 1, S_pool =
    ceil(n_pool / cols_per_split), cut the pool columns [0, n_pool), the next ones the extra
    columns [n_pool, NP), each ``cols_per_split`` columns at most (the host's
    ``column_splits`` launches as many).
    """
    if EXTRA:
        pool_splits = (n_pool + cols_per_split - 1) // cols_per_split
        i_x = i_s - pool_splits  # < 0 on a pool split, else the extra split's number
        col_start = tl.where(i_x < 0, i_s * cols_per_split, n_pool + i_x * cols_per_split)
        col_end = tl.minimum(col_start + cols_per_split, tl.where(i_x < 0, n_pool, NP))
    else:
        col_start = i_s * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, NP)
    return col_start, col_end


@triton.jit
def pool_columns(m_s, o_n, n_pool, EXTRA: tl.constexpr):
    """The mask ``m_s`` [rows, BLOCK_N] cut to the pool columns j < n_pool (the auxiliary
    families C, E have no mixed negatives) under ``EXTRA``; else ``m_s`` as it is."""
    if EXTRA:
        m_s = m_s & (o_n < n_pool)[None, :]
    return m_s


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
    X, Y,  # [NP, D] the columns: flattened pool items and pool users (then the B′ extra ones under EXTRA)
    users, items,  # [M] int64 anchor ids
    x_ids, y_ids,  # [NP] int64 column ids
    index, n_keys, num_items,  # D (bitmap words or sorted keys, see membership.py)
    scale,  # [4] 1/τ, log2(e)/τ, log2(e), ln 2 in the accumulation dtype (SCALE_* above)
    RU, RI, RX, RY,  # [M], [M], [NP], [NP] inverse norms (read for COSINE only)
    QX, QY,  # [NP], [NP] base-2 corrections ℓᴵ·log2(e), ℓᵁ·log2(e) (accumulation dtype; read for LOGQ only)
    BI, BU,  # [M, W] int32 bits of Tᴵ, Tᵁ (negative_mask.py; read for MASK_BITS only)
    LSE,  # [S, 4, M] out: partial base-2 log-sums lse₂ = lse·log2(e) of A, B, C, E per split
    CNT,  # [S, 2, M] out: int32 partial |Tᴵ|, |Tᵁ| per split ([S, 0, M], not written, under MASK_BITS)
    M, NP, D, P, row_offset, cols_per_split,
    n_pool,  # the pool columns N·P (NP − B′; read for EXTRA only)
    W,  # words a row of BI, BU (read for MASK_BITS only)
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    UPCAST: tl.constexpr, COSINE: tl.constexpr, LOGQ: tl.constexpr, EXTRA: tl.constexpr,
    MASK_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Base 2 (as flash attention): with t = U_k·X_j (times r_X[j] for cosine) and the row factor
    # f_k = log2(e)/τ (times r_U[k] for cosine), s·log2(e) = t·f, exp(s − m) = 2^(t·f − m₂):
    # one FFMA and one MUFU.EX2 per score. The row sums l and the counts are kept per tile
    # element and reduced once after the sweep; only the row max is reduced per tile.
    # LOGQ: s₂ = t·f − q₂[j] (corrected scores); EXTRA: C, E over the pool columns j < n_pool.
    # MASK_BITS: the masks are read from the batch's bits (negative_mask.py), whose kernel also
    # counted |Tᴵ|, |Tᵁ|: no gather, no count here.
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_m = o_m < M
    m_d = o_d < D
    scale2 = tl.load(scale + SCALE_LOG2E_TAU)  # log2(e)/τ

    # the rows' embeddings stay in registers for the whole sweep
    p_row = o_m.to(tl.int64)[:, None] * D + o_d[None, :]  # int64: M·D may exceed 2**31
    m_row = m_m[:, None] & m_d[None, :]
    b_u = tl.load(U + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_i = tl.load(I + p_row, mask=m_row, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_user = tl.load(users + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
    b_item = tl.load(items + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
    b_first = (row_offset + o_m) * P  # [BLOCK_M] first column of each row's own block
    # per-row factors f of the base-2 scores: log2(e)/τ, times r for cosine
    b_fu = inv_norms(RU, o_m, m_m, COSINE) * scale2 + tl.full([BLOCK_M], 0.0, dtype=scale2.dtype)  # [BLOCK_M]
    b_fi = inv_norms(RI, o_m, m_m, COSINE) * scale2 + tl.full([BLOCK_M], 0.0, dtype=scale2.dtype)  # [BLOCK_M]

    # running max m₂ of the four base-2 log-sum-exps; per-element sums l and counts of Tᴵ, Tᵁ
    b_m_a = tl.full([BLOCK_M], float("-inf"), dtype=scale2.dtype)
    b_m_b = tl.full([BLOCK_M], float("-inf"), dtype=scale2.dtype)
    b_m_c = tl.full([BLOCK_M], float("-inf"), dtype=scale2.dtype)
    b_m_e = tl.full([BLOCK_M], float("-inf"), dtype=scale2.dtype)
    b_l_a = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=scale2.dtype)
    b_l_b = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=scale2.dtype)
    b_l_c = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=scale2.dtype)
    b_l_e = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=scale2.dtype)
    b_n_item = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.int32)  # per-element |Tᴵ|
    b_n_user = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.int32)  # per-element |Tᵁ|
    p_bits = o_m.to(tl.int64) * W  # [BLOCK_M] the rows' first words in BI, BU (MASK_BITS)
    b_bit = column_bits(BLOCK_N)  # [BLOCK_N] each tile column's bit in its word (MASK_BITS)

    # no split straddles n_pool under EXTRA (the pool counts are then those of the pool splits)
    col_start, col_end = column_split(i_s, NP, n_pool, cols_per_split, EXTRA)
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
        b_qx = column_bias(QX, o_n, m_n, LOGQ)  # [BLOCK_N] q₂ of the X columns (0, unread, without LOGQ)
        b_qy = column_bias(QY, o_n, m_n, LOGQ)  # [BLOCK_N] q₂ of the Y columns

        if MASK_BITS:
            b_lo_i, b_hi_i = tile_bits(BI + p_bits, m_m, j0, col_end, BLOCK_N)  # [BLOCK_M] bits of Tᴵ
            b_lo_u, b_hi_u = tile_bits(BU + p_bits, m_m, j0, col_end, BLOCK_N)  # [BLOCK_M] bits of Tᵁ
            m_item = bits_mask(b_lo_i, b_hi_i, b_bit, BLOCK_N)  # [BLOCK_M, BLOCK_N]
        else:
            # the negatives: in range, outside the row's own block
            m_neg = own_block_excluded(b_first[:, None], o_n[None, :], m_m[:, None] & m_n[None, :], P)
            # Tᴵ_k ∋ j (masks A, E), just before its two tiles
            m_item = true_item_mask(m_neg, b_user[:, None], b_item[:, None], b_xid[None, :],
                                    index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)  # [BLOCK_M, BLOCK_N]
        # A = U Xᵀ / τ (cosine: times r_U[k] r_X[j]):  t = U Xᵀ (·r_X), f = f_U  (LOGQ: s₂ = t·f − q₂)
        b_t = column_scaled(score_dot(b_u, tl.trans(b_x), UPCAST), b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_a, b_l_a = lse2_update(b_m_a, b_l_a, b_t, b_fu, b_qx, m_item, LOGQ)
        # E = I Xᵀ / τ  (EXTRA: pool columns only)
        b_t = column_scaled(score_dot(b_i, tl.trans(b_x), UPCAST), b_rx, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_e, b_l_e = lse2_update(b_m_e, b_l_e, b_t, b_fi, b_qx, pool_columns(m_item, o_n, n_pool, EXTRA), LOGQ)

        # Tᵁ_k ∋ j (masks B, C)
        if MASK_BITS:
            m_user = bits_mask(b_lo_u, b_hi_u, b_bit, BLOCK_N)  # [BLOCK_M, BLOCK_N]
        else:
            m_user = true_user_mask(m_neg, b_user[:, None], b_item[:, None], b_yid[None, :],
                                    index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)  # [BLOCK_M, BLOCK_N]
        # B = I Yᵀ / τ
        b_t = column_scaled(score_dot(b_i, tl.trans(b_y), UPCAST), b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_b, b_l_b = lse2_update(b_m_b, b_l_b, b_t, b_fi, b_qy, m_user, LOGQ)
        # C = U Yᵀ / τ  (EXTRA: pool columns only)
        b_t = column_scaled(score_dot(b_u, tl.trans(b_y), UPCAST), b_ry, COSINE)  # [BLOCK_M, BLOCK_N]
        b_m_c, b_l_c = lse2_update(b_m_c, b_l_c, b_t, b_fu, b_qy, pool_columns(m_user, o_n, n_pool, EXTRA), LOGQ)

        # |Tᴵ| and |Tᵁ| per tile element (reduced after the sweep: no per-tile shuffles); over
        # every column of the split (a split holds pool or extra columns, never both)
        if not MASK_BITS:
            b_n_item += m_item.to(tl.int32)  # [BLOCK_M, BLOCK_N]
            b_n_user += m_user.to(tl.int32)

    # lse₂ = m₂ + log2 Σ_j l[:, j] (base 2: the host converts);  counts = Σ_j n[:, j]
    p_lse = LSE + i_s.to(tl.int64) * 4 * M + o_m
    tl.store(p_lse, finish_lse2(b_m_a, b_l_a), mask=m_m)
    tl.store(p_lse + M, finish_lse2(b_m_b, b_l_b), mask=m_m)
    tl.store(p_lse + 2 * M, finish_lse2(b_m_c, b_l_c), mask=m_m)
    tl.store(p_lse + 3 * M, finish_lse2(b_m_e, b_l_e), mask=m_m)
    if not MASK_BITS:
        p_cnt = CNT + i_s.to(tl.int64) * 2 * M + o_m
        tl.store(p_cnt, tl.reduce(b_n_item, 1, _add), mask=m_m)
        tl.store(p_cnt + M, tl.reduce(b_n_user, 1, _add), mask=m_m)


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
