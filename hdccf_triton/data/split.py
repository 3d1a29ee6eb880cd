"""Preprocessing and the leave-one-out split: from parsed rows to a :class:`Dataset`.

Preprocessing (reproduces Table 2 of the paper: ML-1M gives 6,040 users, 3,416 items
and 999,611 interactions):

1. every rating is an implicit interaction (rating values are ignored);
2. repeated (user, item) pairs are dropped, keeping the first occurrence in the file;
3. items with fewer than ``min_item_interactions`` interactions are removed, then users
   with fewer than ``min_user_interactions`` (one pass each, not an iterated k-core);
4. ids are remapped densely, 0-based, **in sorted order of the original id**
   (numeric order for integer ids, lexicographic for string ids), so SASRec id k
   becomes k-1 and LightGCN's 0-based ids stay as they are. ``Dataset.user_ids`` and
   ``Dataset.item_ids`` give the original id of each dense id.

Split (``split=``):

``"chronological"`` per user, the latest interaction is the test item and the second
                    latest the validation item: by timestamp, ties broken by file order,
                    or by file order alone for the ``sasrec`` format.
``"random"``        a seeded random leave-one-out, even where timestamps exist.
``"auto"``          chronological where the data has time information, else random with
                    a warning that the split is not chronological.

Users with fewer than 3 interactions keep all of them in training (no held-out item:
``valid_items``/``test_items`` hold -1 for them). The LightGCN format keeps its given
test set (``Dataset.test_pairs``) whole: the item and user filters are not applied to it (they
would change the benchmark), only duplicate pairs are dropped (a pair in both files stays in
train). Its validation split is carved from the training set: one item per user with at least
3 training interactions, chosen uniformly at random with ``seed``; the evaluator ranks it with
the test set's protocol (per-user Recall@K/NDCG@K, :mod:`hdccf_triton.metrics`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .dataset import Dataset
from .formats import RawInteractions, import_polars

__all__ = ["build_dataset", "leave_one_out"]


def leave_one_out(
    users: np.ndarray,
    order_key: np.ndarray | None,
    num_users: int,
    *,
    holdout: int = 2,
    min_interactions: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank interactions within their user and pick the held-out ones, vectorised.

    Args:
        users: int64 ``[N]`` dense user ids, in file order.
        order_key: float64 ``[N]`` sort key within a user (timestamp or random), or None
            for file order; ties are broken by file order (stable sort).
        num_users: number of users.
        holdout: how many of the latest interactions to hold out (2: valid + test,
            1: valid only).
        min_interactions: users with fewer interactions hold nothing out.

    Returns:
        ``order`` int64 ``[N]`` (indices sorting by user, then key, then file order) and
        ``from_end`` int64 ``[N]`` aligned with ``order``: 0 for the latest interaction of
        the user, 1 for the one before, ...; -1 where the interaction stays in train
        because its user has fewer than ``min_interactions``.
    """
    n = users.shape[0]
    if order_key is None:
        order = np.argsort(users, kind="stable")
    else:
        order = np.lexsort((order_key, users))  # stable: ties keep file order
    su = users[order]
    counts = np.bincount(su, minlength=num_users)
    starts = np.cumsum(counts) - counts
    pos = np.arange(n, dtype=np.int64) - starts[su]
    from_end = counts[su] - 1 - pos
    from_end = np.where((counts[su] >= min_interactions) & (from_end < holdout), from_end, -1)
    return order.astype(np.int64), from_end.astype(np.int64)


def _remap(frame: Any, col: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense 0-based ids in sorted order of the original id, and the originals."""
    pl = import_polars()
    dense = frame.select((pl.col(col).rank("dense") - 1).cast(pl.Int64))[col].to_numpy()
    originals = frame[col].unique().sort().to_numpy()
    return dense, originals


def _random_key(n: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64).numpy()


def _split_mode(split: str, raw: RawInteractions) -> str:
    """Resolve ``split='auto'``; check that a chronological split is possible."""
    has_time = raw.ordered or "timestamp" in raw.frame.columns
    if split == "chronological" and not has_time:
        raise ValueError(f"split='chronological': {raw.label} has no timestamps and no time order; "
                         "use split='random'")
    if split == "auto":
        if has_time:
            return "chronological"
        warnings.warn(f"{raw.label} has no time information: the leave-one-out split is a seeded "
                      "random choice, not chronological", stacklevel=4)
        return "random"
    return split


def _filter(frame: Any, min_item: int, min_user: int, stats: dict) -> Any:
    """Drop duplicate pairs (keep first), then rare items, then rare users."""
    pl = import_polars()
    stats["raw_rows"] = frame.height
    frame = frame.unique(subset=["user", "item"], keep="first", maintain_order=True)
    stats["duplicates_dropped"] = stats["raw_rows"] - frame.height
    n_items, n_rows = frame["item"].n_unique(), frame.height
    if min_item > 1:
        frame = frame.filter(pl.len().over("item") >= min_item)
    if min_user > 1:
        frame = frame.filter(pl.len().over("user") >= min_user)
    stats["items_removed"] = n_items - frame["item"].n_unique()
    stats["interactions_removed"] = n_rows - frame.height
    if frame.height == 0:
        raise ValueError("min_item_interactions/min_user_interactions: the filter removed every interaction")
    return frame


def build_dataset(raw: RawInteractions, name: str, *, seed: int, split: str, min_item: int, min_user: int) -> Dataset:
    """Filter, remap and split a parsed data set."""
    pl = import_polars()
    stats: dict[str, Any] = {"source": raw.label, "format": raw.fmt, "min_item_interactions": min_item,
                             "min_user_interactions": min_user}
    frame = raw.frame.drop("line")
    if raw.test is not None:  # pre-split: filter and remap over train and test together
        # Train rows first, so a pair in both files counts as training (duplicates keep the first).
        frame = pl.concat([frame.select("user", "item").with_columns(pl.lit(True).alias("train")),
                           raw.test.select("user", "item").with_columns(pl.lit(False).alias("train"))])
    if raw.test is not None:
        # A given split is the benchmark itself: filtering it would silently change its test set.
        stats.update(min_item_interactions=0, min_user_interactions=0,
                     filters="not applied: the test set is given")
        frame = _filter(frame, 0, 0, stats)
    else:
        frame = _filter(frame, min_item, min_user, stats)
    users, user_ids = _remap(frame, "user")
    items, item_ids = _remap(frame, "item")
    num_users, num_items = len(user_ids), len(item_ids)
    valid = np.full(num_users, -1, dtype=np.int64)
    test = np.full(num_users, -1, dtype=np.int64)
    test_pairs = None
    if raw.test is not None:
        if split == "chronological":
            raise ValueError(f"split='chronological': {raw.label} has no time information; its test "
                             "set is given and the validation items are drawn at random")
        from_train = frame["train"].to_numpy()
        test_pairs = (torch.from_numpy(users[~from_train]), torch.from_numpy(items[~from_train]))
        tu, ti = users[from_train], items[from_train]
        order, from_end = leave_one_out(tu, _random_key(tu.shape[0], seed), num_users, holdout=1)
        mode = "given test set, random validation"
        su, si = tu[order], ti[order]
        valid[su[from_end == 0]] = si[from_end == 0]
        train_u, train_i = su[from_end < 0], si[from_end < 0]
        split_counts = np.bincount(tu, minlength=num_users)
    else:
        mode = _split_mode(split, raw)
        if mode == "random":
            key = _random_key(frame.height, seed)
        elif "timestamp" in frame.columns:
            key = frame["timestamp"].to_numpy()
        else:
            key = None  # file order is time order
        order, from_end = leave_one_out(users, key, num_users)
        su, si = users[order], items[order]
        valid[su[from_end == 1]] = si[from_end == 1]
        test[su[from_end == 0]] = si[from_end == 0]
        train_u, train_i = su[from_end < 0], si[from_end < 0]
        split_counts = np.bincount(users, minlength=num_users)
    if "random" in mode:
        stats["split_seed"] = seed
    stats.update(
        split=mode,
        num_users=num_users,
        num_items=num_items,
        num_interactions=int(frame.height),
        density=frame.height / (num_users * num_items),
        num_train=int(train_u.shape[0]),
        num_valid=int((valid >= 0).sum()),
        num_test=int(test_pairs[0].numel()) if test_pairs is not None else int((test >= 0).sum()),
        users_train_only=int((split_counts < 3).sum()),
    )
    return Dataset(
        name=name,
        num_users=num_users,
        num_items=num_items,
        train_users=torch.from_numpy(np.ascontiguousarray(train_u, dtype=np.int64)),
        train_items=torch.from_numpy(np.ascontiguousarray(train_i, dtype=np.int64)),
        valid_items=torch.from_numpy(valid),
        test_items=torch.from_numpy(test),
        test_pairs=test_pairs,
        user_ids=user_ids,
        item_ids=item_ids,
        stats=stats,
    )
