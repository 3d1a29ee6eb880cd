"""The training interactions D, answering "is (u, i) observed?" for whole tensors of pairs.

SPEC.md marks a negative as false when the pair it forms with the anchor was observed in
training. The loss asks that question for every (row, column) of the in-batch score matrix,
so membership must be a tensor operation on the embeddings' device: the pairs are stored as
sorted 64-bit keys ``user * num_items + item`` and looked up with ``torch.searchsorted``
(the Triton kernels run the same binary search inside the tile).
"""

from __future__ import annotations

import torch

__all__ = ["InteractionIndex"]

#: Largest num_users·num_items for which membership is answered from a dense boolean table
#: (one byte a pair, built on first use) instead of a binary search: 256 MiB.
DENSE_TABLE_LIMIT = 1 << 28


def _as_id_tensor(name: str, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.numel() == 0:  # an empty list arrives as float32
        ids = ids.to(torch.int64)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of ids, got shape {tuple(ids.shape)}")
    return ids.to(torch.int64)


class InteractionIndex:
    """The set D of observed (user, item) training pairs.

    Build it with :meth:`from_pairs`; query it with :meth:`contains`. It lives on one device
    (``.device``) and moves with :meth:`to`, which returns a new index.

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
        self._dense: torch.Tensor | None = None

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
        keys = torch.unique(users.to(items.device) * num_items + items)  # sorted
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

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each ``(users[...], items[...])`` is in D.

        Args:
            users, items: int64 tensors of broadcastable shapes on ``self.device``; ids in range.

        Returns:
            A bool tensor of the broadcast shape.
        """
        query = users * self.num_items + items
        if self.keys.numel() == 0:
            return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
        if self.num_users * self.num_items <= DENSE_TABLE_LIMIT:
            # one gather instead of ~log2|D| dependent ones: the reference's hot spot
            if self._dense is None:
                dense = torch.zeros(self.num_users * self.num_items, dtype=torch.bool, device=self.device)
                self._dense = dense.index_fill_(0, self.keys, True)
            return self._dense[query]
        pos = torch.searchsorted(self.keys, query.reshape(-1)).clamp_(max=self.keys.numel() - 1)
        return (self.keys[pos] == query.reshape(-1)).reshape(query.shape)

    def __repr__(self) -> str:
        return (
            f"InteractionIndex({len(self)} pairs, num_users={self.num_users}, "
            f"num_items={self.num_items}, device={self.device})"
        )


def _check_range(name: str, ids: torch.Tensor, upper: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")
