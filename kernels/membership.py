"""In-kernel false-negative flags: "is (u, i) a training pair?" and the true-negative masks.

hdccf_triton/LOSS.md ("False negatives") marks column j of row k as a false negative when its id equals the anchor's, or when
the pair it forms with the anchor is in the training set D. The kernels ask this for every
element of a [BLOCK_M, BLOCK_N] tile, so D is looked up inside the kernel, never as an
M × N·P mask in memory. Two layouts of D, chosen by the constexpr ``INDEX_MODE``:

* ``INDEX_MODE = 1``, dense bitmap: bit ``key = u·num_items + i`` of an int32 word array
  (word ``key >> 5``, bit ``key & 31``). One gather per query. Used when
  ``num_users·num_items <= 2**31`` bits (256 MiB); the fast path.
* ``INDEX_MODE = 2``, sorted keys: the int64 keys ``u·num_items + i``, sorted and unique (the
  ``InteractionIndex.keys`` tensor as is), searched branch-free in ``SEARCH_STEPS =
  ceil(log2(|D| + 1))`` steps plus one final gather. The general fallback.
* ``INDEX_MODE = 0``: no D; only identity false negatives.

Everything is elementwise on tiles of any shape, so the same helpers serve the row-major
[BLOCK_M, BLOCK_N] tiles of the forward and row-parallel backward and the transposed
[BLOCK_N, BLOCK_M] tiles of the column-parallel backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["bitmap_contains", "sorted_contains", "index_contains", "true_negative_masks",
           "membership_probe_kernel"]


@triton.jit
def bitmap_contains(bitmap, b_key, m_q):
    """Whether each key of ``b_key`` has its bit set in ``bitmap`` (int32 words).

    Args:
        bitmap: pointer to ``ceil(num_users·num_items / 32)`` int32 words.
        b_key: int32 or int64 tile of keys ``u·num_items + i`` (any shape).
        m_q: bool tile, the queries to answer (others read nothing and return False).
    """
    # word w = key // 32, bit b = key mod 32:  (D ∋ key)  ⇔  (bitmap[w] >> b) & 1
    b_word = tl.load(bitmap + (b_key >> 5), mask=m_q, other=0)  # int32, shape of b_key
    b_bit = (b_key & 31).to(tl.int32)
    return m_q & (((b_word >> b_bit) & 1) != 0)


@triton.jit
def sorted_contains(keys, n_keys, b_key, m_q, SEARCH_STEPS: tl.constexpr):
    """Whether each key of ``b_key`` is among the ``n_keys`` sorted unique int64 ``keys``.

    A branch-free lower bound by binary lifting: ``pos`` counts the keys below the query;
    ``2**SEARCH_STEPS - 1 >= n_keys`` (``SEARCH_STEPS = ceil(log2(n_keys + 1))``), so the
    descending power-of-two steps can reach every position.

    Args:
        keys: pointer to ``n_keys`` int64 keys, sorted ascending, unique.
        b_key: int64 tile of queries (any shape); m_q: bool tile, the queries to answer.
        ``n_keys < 2**31``: positions are int32.
    """
    # invariant: keys[0 .. pos-1] < q.  step 2^s: if keys[pos + 2^s − 1] < q then pos += 2^s
    b_pos = tl.full(b_key.shape, 0, dtype=tl.int32)  # shape of b_key; |D| < 2**31
    for s in tl.static_range(SEARCH_STEPS):
        b_cand = b_pos + (1 << (SEARCH_STEPS - 1 - s))
        m_c = m_q & (b_cand <= n_keys)
        b_probe = tl.load(keys + b_cand - 1, mask=m_c, other=0)
        b_pos = tl.where(m_c & (b_probe < b_key), b_cand, b_pos)
    # pos = |{keys < q}|: q ∈ D ⇔ pos < n and keys[pos] = q
    m_in = m_q & (b_pos < n_keys)
    b_hit = tl.load(keys + b_pos, mask=m_in, other=0)
    return m_in & (b_hit == b_key)


@triton.jit
def index_contains(index, n_keys, b_key, m_q, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """``(key ∈ D)`` for a tile of keys with the layout ``INDEX_MODE`` (see module doc): int32
    keys suffice for the bitmap, the sorted keys need int64 queries."""
    if INDEX_MODE == 1:
        m_hit = bitmap_contains(index, b_key, m_q)
    elif INDEX_MODE == 2:
        m_hit = sorted_contains(index, n_keys, b_key, m_q, SEARCH_STEPS)
    else:
        m_hit = m_q & (b_key < 0)  # all False (keys are non-negative)
    return m_hit


@triton.jit
def true_negative_masks(
    b_user, b_item, b_block,  # anchor ids u_k, i_k and own block row_offset + k (int tiles)
    b_xid, b_yid, b_owner,  # column ids X_id[j], Y_id[j] and owner block j // P
    m_valid,  # bool tile: row and column in range
    index, n_keys, num_items,
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """The true-negative masks (Tᴵ, Tᵁ) of hdccf_triton/LOSS.md on a tile, from broadcastable id tiles.

    Row-major tiles pass the row ids as ``[BLOCK_M, 1]`` and the column ids as
    ``[1, BLOCK_N]``; transposed tiles the other way round. Ids may be int32 (the Triton
    backend's, fewer registers) or int64. Returns two bool tiles of the
    broadcast shape: ``m_item`` (column j is in Tᴵ_k: masks A and E) and ``m_user`` (Tᵁ_k:
    masks B and C). Without ``DEBIAS`` both are the plain negatives.
    """
    # negative: column j is outside row k's own block
    m_neg = m_valid & (b_owner != b_block)
    if DEBIAS:
        # φᴵ[k, j] = (X_id[j] = i_k) or (u_k, X_id[j]) ∈ D;   Tᴵ = negative ∧ ¬φᴵ
        m_item = m_neg & (b_xid != b_item)
        # φᵁ[k, j] = (Y_id[j] = u_k) or (Y_id[j], i_k) ∈ D;   Tᵁ = negative ∧ ¬φᵁ
        m_user = m_neg & (b_yid != b_user)
        if INDEX_MODE == 1:  # keys < 2**31 (the bitmap's bound): int32 arithmetic
            m_item = m_item & ~bitmap_contains(
                index, b_user.to(tl.int32) * num_items + b_xid.to(tl.int32), m_item)
            m_user = m_user & ~bitmap_contains(
                index, b_yid.to(tl.int32) * num_items + b_item.to(tl.int32), m_user)
        elif INDEX_MODE == 2:  # keys up to 2**63: int64
            m_item = m_item & ~sorted_contains(
                index, n_keys, b_user.to(tl.int64) * num_items + b_xid.to(tl.int64), m_item, SEARCH_STEPS)
            m_user = m_user & ~sorted_contains(
                index, n_keys, b_yid.to(tl.int64) * num_items + b_item.to(tl.int64), m_user, SEARCH_STEPS)
    else:
        m_item = m_neg
        m_user = m_neg
    return m_item, m_user


@triton.jit
def membership_probe_kernel(
    users, items,  # [Q] int64 query pairs
    out,  # [Q] int8: 1 when (users[q], items[q]) ∈ D
    index, n_keys, num_items, Q,
    INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Answer ``(users[q], items[q]) ∈ D`` for a vector of pairs (tests and debugging)."""
    o_q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_q = o_q < Q
    b_u = tl.load(users + o_q, mask=m_q, other=0)  # [BLOCK]
    b_i = tl.load(items + o_q, mask=m_q, other=0)  # [BLOCK]
    m_hit = index_contains(index, n_keys, b_u * num_items + b_i, m_q, INDEX_MODE, SEARCH_STEPS)
    tl.store(out + o_q, m_hit.to(tl.int8), mask=m_q)
