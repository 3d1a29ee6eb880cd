"""The training interactions D and every pair-key, CSR and membership helper, written once.

``hdccf_triton/LOSS.md`` ("False negatives") marks a negative as false when the pair it forms
with the anchor was observed in training. The loss asks that question for every (row,
column) of the in-batch score matrix, so membership must be a tensor operation on the
embeddings' device. A pair (u, i) is stored as the 64-bit key ``u * num_items + i``
(:func:`pair_keys`); D is the sorted, unique keys, answered either from a dense bitmap
(:meth:`InteractionIndex.bitmap`; the Triton kernels read a byte-aligned variant, one row a
user, :meth:`InteractionIndex.row_bitmap`) or by a binary search over the keys
(:func:`sorted_contains`, the search the kernels run inside a tile). The reference backend
reads the dense tables of :meth:`InteractionIndex.table` where they are small and the lists of
:meth:`InteractionIndex.lists` on sparse data.

The sampler (:mod:`hdccf_triton.sampling`) and the evaluator (:mod:`hdccf_triton.metrics`)
build their per-user and per-item lists with :func:`build_csr` and friends from here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "BITMAP_MAX_BITS",
    "CSR",
    "InteractionIndex",
    "build_csr",
    "check_pairs",
    "csr_keys",
    "csr_segments",
    "pair_keys",
    "sorted_contains",
    "unique_csr",
]

#: Largest num_users·num_items for which D is held as a dense bitmap (one bit a pair,
#: 256 MiB at the limit) rather than answered by a binary search over the sorted keys.
BITMAP_MAX_BITS = 1 << 31
#: Largest num_users·num_items for which :meth:`InteractionIndex.table` builds its dense
#: tables (one byte a pair, two tables).
TABLE_MAX_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- keys and search


def pair_keys(users: torch.Tensor, items: torch.Tensor, num_items: int) -> torch.Tensor:
    """The key ``users * num_items + items`` of each pair (broadcasting shapes).

    Keys sort by user, then item, so a sorted key array is D grouped by user.

    Args:
        users, items: int64 tensors of broadcastable shapes, ids in range.
        num_items: the item id range.

    Returns:
        int64 keys of the broadcast shape.
    """
    return users * num_items + items


def sorted_contains(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Whether each key of ``query`` is in ``sorted_keys``: one binary search per key.

    Args:
        sorted_keys: int64 ``[K]``, ascending (K may be 0).
        query: int64 keys of any shape, on the device of ``sorted_keys``.

    Returns:
        A bool tensor of the shape of ``query``.
    """
    if sorted_keys.numel() == 0:
        return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
    query = query.contiguous()  # searchsorted would copy (and warn) otherwise
    # searchsorted gives the first position >= key; past the end means absent, and the
    # clamp turns that into a comparison that fails instead of an out-of-range read.
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == query


# --------------------------------------------------------------------------- CSR


class CSR(NamedTuple):
    """Compressed rows of a set of (row, col) pairs, columns sorted within each row.

    Attributes:
        indptr: int64 ``[num_rows + 1]``; row r holds ``indices[indptr[r]:indptr[r+1]]``.
        indices: int64 ``[N]`` column ids, ascending within each row.
        position: int64 ``[N]``; ``position[n]`` is where input pair n sits inside its row
            (``indices[indptr[rows[n]] + position[n]] == cols[n]``).
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    position: torch.Tensor

    @property
    def degree(self) -> torch.Tensor:
        """int64 ``[num_rows]``: number of entries of each row."""
        return self.indptr[1:] - self.indptr[:-1]


def build_csr(rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> CSR:
    """CSR of pairs ``(rows[n], cols[n])``, with each pair's position inside its row.

    Args:
        rows, cols: int64 ``[N]`` with rows in ``[0, num_rows)``, cols in ``[0, num_cols)``.
        num_rows, num_cols: id ranges.

    Returns:
        A :class:`CSR` on the device of ``rows``. Repeated pairs stay repeated.
    """
    # One sort of the combined key gives rows ascending and columns ascending within a row.
    order = torch.sort(pair_keys(rows, cols, num_cols), stable=True).indices
    counts = torch.bincount(rows, minlength=num_rows)
    indptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    indptr[1:] = torch.cumsum(counts, 0)
    sorted_rows = rows[order]
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=rows.device) - indptr[sorted_rows]
    return CSR(indptr, cols[order].contiguous(), position)


def unique_csr(rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> CSR:
    """CSR of the distinct pairs ``(rows[n], cols[n])`` (a pair listed twice appears once).

    Args and returns as :func:`build_csr`; ``position`` refers to the distinct pairs in key
    order, not to the input.
    """
    keys = torch.unique(pair_keys(rows, cols, num_cols))
    return build_csr(keys // num_cols, keys % num_cols, num_rows, num_cols)


def csr_keys(indptr: torch.Tensor, indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """int64 ``[N]``: the pair key ``row * num_cols + col`` of every CSR entry, in CSR order
    (sorted, and distinct for a :func:`unique_csr`)."""
    rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1, device=indptr.device),
                                   indptr[1:] - indptr[:-1])
    return pair_keys(rows, indices, num_cols)


def csr_segments(indptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry of CSR rows ``rows [B]``, vectorised.

    Returns:
        ``(local [T], flat [T])`` int64: for each of the T entries of the selected rows (in
        the order of ``rows``), the index into ``rows`` it belongs to and its position in
        the CSR's ``indices``.
    """
    start = indptr[rows]
    deg = indptr[rows + 1] - start
    total = int(deg.sum())
    local = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), deg,
                                    output_size=total)
    # entry t of the concatenation sits at start[row] + (t - first[row]) in the CSR
    shift = start - (torch.cumsum(deg, 0) - deg)
    return local, torch.arange(total, device=rows.device) + shift.index_select(0, local)


# --------------------------------------------------------------------------- checks


def check_pairs(users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int,
                *, name: str = "users/items") -> None:
    """Raise TypeError/ValueError unless (users, items) are valid int64 id pairs.

    Args:
        users, items: int64 ``[N]``, N >= 1, ids in ``[0, num_users)`` / ``[0, num_items)``.
    """
    for arg, t in (("users", users), ("items", items)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{arg}: expected dtype int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{arg}: expected shape [N], got {tuple(t.shape)}")
    if users.shape != items.shape:
        raise ValueError(f"{name}: shapes {tuple(users.shape)} and {tuple(items.shape)} differ")
    if users.numel() == 0:
        raise ValueError(f"{name}: no training pairs")
    _check_range("users", users, num_users)
    _check_range("items", items, num_items)


def _check_range(name: str, ids: torch.Tensor, upper: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")


def _as_id_tensor(name: str, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.numel() == 0:  # an empty list arrives as float32
        ids = ids.to(torch.int64)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of ids, got shape {tuple(ids.shape)}")
    return ids.to(torch.int64)


# --------------------------------------------------------------------------- the index


class InteractionIndex:
    """The set D of observed (user, item) training pairs.

    Build it with :meth:`from_pairs`; query it with :meth:`contains`. It lives on one device
    (``.device``) and moves with :meth:`to`, which returns a new index. The keys are not
    meant to change after construction: the bitmap is built from them once.

    Attributes:
        keys: ``[|D|]`` int64, sorted and unique, ``user * num_items + item``.
        num_users, num_items: the id ranges; ids must lie in ``[0, num_users)`` and
            ``[0, num_items)``.
    """

    def __init__(self, keys: torch.Tensor, num_users: int, num_items: int):
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise TypeError("keys must be a 1-D int64 tensor (use InteractionIndex.from_pairs)")
        self.keys = keys
        self.num_users = int(num_users)
        self.num_items = int(num_items)
        self._bitmap: torch.Tensor | None = None
        self._tables: dict[str, torch.Tensor] = {}
        self._lists: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._row_bitmap: torch.Tensor | None = None

    @classmethod
    def from_pairs(cls, users, items, num_users: int, num_items: int) -> "InteractionIndex":
        """Index the pairs ``(users[n], items[n])``; duplicates are kept once.

        Args:
            users: ``[N]`` integer user ids in ``[0, num_users)``.
            items: ``[N]`` integer item ids in ``[0, num_items)``.
            num_users, num_items: positive id ranges.
        """
        users = _as_id_tensor("users", users)
        items = _as_id_tensor("items", items)
        if users.shape != items.shape:
            raise ValueError(
                f"users and items must have the same length, got {users.numel()} and {items.numel()}"
            )
        for name, n in (("num_users", num_users), ("num_items", num_items)):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if num_users * num_items >= 2**63:
            raise ValueError("num_users * num_items must fit in 63 bits")
        if users.numel():
            _check_range("users", users, num_users)
            _check_range("items", items, num_items)
        keys = torch.unique(pair_keys(users.to(items.device), items, num_items))  # sorted
        return cls(keys, num_users, num_items)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def __len__(self) -> int:
        return self.keys.numel()

    def to(self, device) -> "InteractionIndex":
        """This index on ``device`` (``self`` when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return InteractionIndex(self.keys.to(device), self.num_users, self.num_items)

    @property
    def uses_bitmap(self) -> bool:
        """Whether membership is answered from :meth:`bitmap`: ``num_users * num_items <=
        BITMAP_MAX_BITS``; above that, by a binary search over :attr:`keys`."""
        return self.num_users * self.num_items <= BITMAP_MAX_BITS

    def bitmap(self) -> torch.Tensor:
        """D as a dense bitmap: int32 ``[(num_users * num_items + 31) // 32]`` words on
        ``self.device``, bit ``key & 31`` of word ``key >> 5`` set for each key.

        Built on the first call and kept (later calls return the same tensor), whatever
        :attr:`uses_bitmap` says: the caller decides whether it fits.
        """
        if self._bitmap is None:
            keys = self.keys
            n_words = (self.num_users * self.num_items + 31) // 32
            # the keys are unique, so the bits of one word are distinct and their sum is their OR;
            # bit 31 is −2**31 in int32 and the sum of the others stays below 2**31: no overflow
            bits = torch.ones_like(keys) << (keys & 31)
            bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
            words = torch.zeros(n_words, dtype=torch.int32, device=keys.device)
            self._bitmap = words.index_add_(0, keys >> 5, bits)
        return self._bitmap

    def row_bitmap(self) -> torch.Tensor:
        """D as the Triton kernels' ``INDEX_MODE = 1`` reads it (``kernels/membership.py``): uint8
        ``[num_users · NB]``, one row of NB = ceil(num_items / 8) bytes per user, bit ``i & 7`` of
        byte ``u·NB + (i >> 3)`` set when (u, i) ∈ D. Rows padded to whole bytes, unlike
        :meth:`bitmap`, so that a byte's offset splits into a user part and an item part (per row
        and per column of a tile); at most ``num_users`` bytes larger. Built on the first call
        and kept."""
        if self._row_bitmap is None:
            nb = (self.num_items + 7) // 8
            users, items = self.keys // self.num_items, self.keys % self.num_items
            rows = torch.zeros(self.num_users * nb, dtype=torch.uint8, device=self.device)
            # keys are unique: the bits of one byte are distinct, so their sum is their OR
            bits = torch.bitwise_left_shift(torch.ones_like(items), items & 7).to(torch.uint8)
            self._row_bitmap = rows.index_put_((users * nb + (items >> 3),), bits, accumulate=True)
        return self._row_bitmap

    def table(self, kind: str) -> torch.Tensor | None:
        """D as a dense bool table whose rows are cheap to read, or None above ``TABLE_MAX_BYTES``.

        ``kind="items"``: ``[num_users, num_items]``, row u holds u's items (user-major);
        ``kind="users"``: ``[num_items, num_users]``, row i holds i's users (item-major). Each
        is built on its first call and kept (one byte a pair: 21 MB each for ML-1M). The
        reference backend reads the rows of a batch's anchors and gathers the batch's
        columns from them, which costs a few cache-resident reads a pair.
        """
        if kind not in ("items", "users"):
            raise ValueError(f"kind: expected 'items' or 'users', got {kind!r}")
        if self.num_users * self.num_items > TABLE_MAX_BYTES:
            return None
        if kind not in self._tables:
            rows, cols = self.keys // self.num_items, self.keys % self.num_items
            shape = (self.num_users, self.num_items) if kind == "items" else (self.num_items, self.num_users)
            flat = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=self.device)
            flat[rows * shape[1] + cols if kind == "items" else cols * shape[1] + rows] = True
            self._tables[kind] = flat.view(shape)
        return self._tables[kind]

    def lists(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """D as sorted lists, CSR ``(indptr, indices)``, built on the first call and kept.

        ``kind="items"``: ``indptr [num_users + 1]``, the items of user u are
        ``indices[indptr[u]:indptr[u + 1]]``; ``kind="users"``: ``indptr [num_items + 1]``,
        the users of each item. Ids ascending within a list.
        """
        if kind not in ("items", "users"):
            raise ValueError(f"kind: expected 'items' or 'users', got {kind!r}")
        if kind not in self._lists:
            users, items = self.keys // self.num_items, self.keys % self.num_items
            if kind == "items":  # the keys are sorted by user, then item
                rows, cols, n_rows = users, items, self.num_users
            else:
                order = torch.argsort(items * self.num_users + users)
                rows, cols, n_rows = items[order], users[order], self.num_items
            indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=self.device)
            indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
            self._lists[kind] = (indptr, cols.contiguous())
        return self._lists[kind]

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each ``(users[...], items[...])`` is in D.

        Args:
            users, items: int64 tensors of broadcastable shapes on ``self.device``; ids in range.

        Returns:
            A bool tensor of the broadcast shape.
        """
        if self.keys.numel() and self.uses_bitmap:
            # One gather instead of ~log2|D| dependent ones: the reference's hot spot. Keys
            # below num_users * num_items <= 2**31 fit int32, which halves the memory traffic,
            # and the in-place steps allocate nothing more; so the 8x smaller bitmap is about
            # as fast as a one-byte-a-pair table (ML-1M size, one thread).
            query = pair_keys(users.to(torch.int32), items.to(torch.int32), self.num_items)
            words = self.bitmap().index_select(0, (query >> 5).reshape(-1)).view(query.shape)
            # the shift is arithmetic, so bit 31 (a negative word) still gives 1 after the & 1
            return words.bitwise_right_shift_(query.bitwise_and_(31)).bitwise_and_(1).to(torch.bool)
        return sorted_contains(self.keys, pair_keys(users, items, self.num_items))

    def __repr__(self) -> str:
        return (
            f"InteractionIndex({len(self)} pairs, num_users={self.num_users}, "
            f"num_items={self.num_items}, device={self.device})"
        )
