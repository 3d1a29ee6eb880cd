"""In-kernel false-negative flags: "is (u, i) a training pair?" and the true-negative masks.

hdccf_triton/LOSS.md ("False negatives") marks column j of row k as a false negative when its id equals the anchor's, or when
the pair it forms with the anchor is in the training set D. The kernels ask this for every
element of a [BLOCK_M, BLOCK_N] tile, so D is looked up inside the kernel, never as an
M × N·P mask in memory. Two layouts of D, chosen by the constexpr ``INDEX_MODE``:

* ``INDEX_MODE = 1``, dense row bitmap: one row of ``NB = ceil(num_items / 8)`` bytes per
  user, bit ``i & 7`` of byte ``u·NB + (i >> 3)`` set when (u, i) ∈ D
  (``hdccf_triton.InteractionIndex.row_bitmap``). The byte offset is a row part plus
  a column part, so on a [rows, columns] tile the multiplications, shifts and bit masks are
  per row or per column, never per pair: a pair costs an address add, one 8-bit gather and a
  bit test (``LOP3``). 8-bit gathers also stay plain loads, where Triton's software pipeliner
  turns 32-bit gathers into ``cp.async`` copies read back from shared memory. Used when
  ``num_users·num_items <= 2**31`` (256 MiB); the fast path.
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

__all__ = ["bitmap_contains", "sorted_contains", "index_contains", "true_negative_masks", "own_block_excluded",
           "true_item_mask", "true_user_mask", "membership_probe_kernel"]


@triton.jit
def bitmap_contains(rowmap, b_user, b_item, num_items, m_q):
    """Whether (u, i) ∈ D for broadcastable tiles of users ``b_user`` and items ``b_item``
    (valid ids, 0 ≤ u < num_users, 0 ≤ i < num_items, everywhere: the byte is read even off
    ``m_q``), from the row bitmap ``rowmap`` (``INDEX_MODE = 1``, module doc); False off ``m_q``.

    The byte offset u·NB + (i >> 3) and the bit 1 << (i & 7) are formed on the operands
    before they broadcast: on a [rows, 1] × [1, columns] tile, once per row and per column."""
    NB = (num_items + 7) >> 3  # bytes per user row
    p_row = rowmap + b_user.to(tl.int32) * NB  # row part: a pointer (shape of b_user)
    b_col = (b_item >> 3).to(tl.int32)  # column part (shape of b_item)
    b_bit = (1 << (b_item & 7)).to(tl.int32)  # the bit in its byte (shape of b_item)
    # unmasked: ids are in range, and 0 where a row or column is (masked loads gave 0), so
    # every address is valid; the mask applies to the answer (no predicated load, no zeroing)
    b_word = tl.load(p_row + b_col)  # uint8, broadcast shape
    return m_q & ((b_word.to(tl.int32) & b_bit) != 0)


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
def index_contains(index, n_keys, num_items, b_user, b_item, m_q, INDEX_MODE: tl.constexpr,
                   SEARCH_STEPS: tl.constexpr):
    """``((u, i) ∈ D)`` for tiles of users and items with the layout ``INDEX_MODE`` (see module
    doc): the row bitmap takes int32 ids, the sorted keys int64 queries."""
    if INDEX_MODE == 1:
        m_hit = bitmap_contains(index, b_user, b_item, num_items, m_q)
    elif INDEX_MODE == 2:
        m_hit = sorted_contains(index, n_keys, b_user.to(tl.int64) * num_items + b_item.to(tl.int64), m_q, SEARCH_STEPS)
    else:
        m_hit = m_q & (b_user < 0)  # all False (ids are non-negative)
    return m_hit


@triton.jit
def own_block_excluded(b_first, b_col, m_valid, P):
    """The negatives: in range and outside row k's own block, the P columns [first_k, first_k + P)
    (a subtraction and a compare per pair, no division j // P); broadcast shape."""
    b_off = b_col - b_first
    return m_valid & ((b_off < 0) | (b_off >= P))


@triton.jit
def true_item_mask(m_neg, b_user, b_item, b_xid, index, n_keys, num_items,
                   DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Tᴵ (masks A and E) from the negatives ``m_neg``:
    φᴵ[k, j] = (X_id[j] = i_k) or (u_k, X_id[j]) ∈ D;   Tᴵ = negative ∧ ¬φᴵ."""
    m_item = m_neg
    if DEBIAS:
        m_item = m_neg & (b_xid != b_item)
        if INDEX_MODE == 1:  # row bitmap: offsets < 2**31 (its bound), int32 arithmetic
            m_item = m_item & ~bitmap_contains(index, b_user, b_xid, num_items, m_item)
        elif INDEX_MODE == 2:  # keys up to 2**63: int64
            m_item = m_item & ~sorted_contains(
                index, n_keys, b_user.to(tl.int64) * num_items + b_xid.to(tl.int64), m_item, SEARCH_STEPS)
    return m_item


@triton.jit
def true_user_mask(m_neg, b_user, b_item, b_yid, index, n_keys, num_items,
                   DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Tᵁ (masks B and C) from the negatives ``m_neg``:
    φᵁ[k, j] = (Y_id[j] = u_k) or (Y_id[j], i_k) ∈ D;   Tᵁ = negative ∧ ¬φᵁ."""
    m_user = m_neg
    if DEBIAS:
        m_user = m_neg & (b_yid != b_user)
        if INDEX_MODE == 1:
            m_user = m_user & ~bitmap_contains(index, b_yid, b_item, num_items, m_user)
        elif INDEX_MODE == 2:
            m_user = m_user & ~sorted_contains(
                index, n_keys, b_yid.to(tl.int64) * num_items + b_item.to(tl.int64), m_user, SEARCH_STEPS)
    return m_user


@triton.jit
def true_negative_masks(
    b_user, b_item, b_first,  # anchor ids u_k, i_k and first own column (row_offset + k)·P (int tiles)
    b_xid, b_yid, b_col,  # column ids X_id[j], Y_id[j] and column index j
    m_valid,  # bool tile: row and column in range
    P, index, n_keys, num_items,
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """The true-negative masks (Tᴵ, Tᵁ) of hdccf_triton/LOSS.md on a tile, from broadcastable id tiles.

    Row-major tiles pass the row ids as ``[BLOCK_M, 1]`` and the column ids as
    ``[1, BLOCK_N]``; transposed tiles the other way round. Ids may be int32 (the Triton
    backend's, fewer registers) or int64. Returns two bool tiles of the
    broadcast shape: ``m_item`` (column j is in Tᴵ_k: masks A and E) and ``m_user`` (Tᵁ_k:
    masks B and C). Without ``DEBIAS`` both are the plain negatives. (The dot/cosine kernels
    call the three parts themselves, each mask just before the two score tiles that use it, so
    that fewer mask bits are live at once.)
    """
    m_neg = own_block_excluded(b_first, b_col, m_valid, P)
    m_item = true_item_mask(m_neg, b_user, b_item, b_xid, index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)
    m_user = true_user_mask(m_neg, b_user, b_item, b_yid, index, n_keys, num_items, DEBIAS, INDEX_MODE, SEARCH_STEPS)
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
    m_hit = index_contains(index, n_keys, num_items, b_u, b_i, m_q, INDEX_MODE, SEARCH_STEPS)
    tl.store(out + o_q, m_hit.to(tl.int8), mask=m_q)
