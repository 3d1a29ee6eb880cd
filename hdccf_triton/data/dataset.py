"""The :class:`Dataset` (dense ids and a leave-one-out split) and its one-file form.

:meth:`Dataset.save` writes the filtered, remapped and split interactions with
``torch.save``, atomically and behind a SHA-256 (:mod:`hdccf_triton.atomic`);
:func:`~hdccf_triton.data.load_dataset` reads such a file (suffix ``.pt``, or ``format="saved"``)
with ``torch.load(weights_only=True)`` after verifying the checksum (:func:`read_saved_dataset`):
a truncated or altered file is refused with an error naming it. The
file carries the split, so it is the way to train on a machine that has torch but not the
loaders' polars (a GPU box without network) on exactly the split made here:

    >>> load_dataset("ml-1m", data_dir="../shared/data").save("runs/ml1m.pt")  # doctest: +SKIP
    >>> ds = load_dataset("runs/ml1m.pt")                                        # doctest: +SKIP

The settings that made the split (split mode, its seed for a random split, the minimum
interaction counts) are checked against the ones asked for, so a saved file cannot stand in
silently for a different split.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import load_checked, save_checked

__all__ = ["Dataset", "read_saved_dataset", "save_dataset"]


@dataclasses.dataclass(eq=False)
class Dataset:
    """Implicit-feedback interactions with dense ids and a leave-one-out split.

    Attributes:
        name: where the data came from (name or path).
        num_users, num_items: sizes of the dense id ranges.
        train_users, train_items: int64 ``[N]``, the training pairs (unique), sorted by
            user and, within a user, in time (or split) order.
        valid_items: int64 ``[num_users]``, the validation item of each user, -1 where absent.
        test_items: int64 ``[num_users]``, the test item of each user, -1 where absent
            (all -1 when the data set comes with its own multi-item test set, see
            ``test_pairs``).
        test_pairs: ``(users [T], items [T])`` int64, a given test set with any number of
            items per user (LightGCN format), else None.
        user_ids, item_ids: original id of each dense id (numpy arrays), when known.
        stats: counts from loading (raw rows, duplicates, filtered items, split sizes...).
    """

    name: str
    num_users: int
    num_items: int
    train_users: torch.Tensor
    train_items: torch.Tensor
    valid_items: torch.Tensor
    test_items: torch.Tensor
    test_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.train_users.shape
        if self.train_items.shape != n or len(n) != 1:
            raise ValueError(f"train_users/train_items: shapes {n} and {self.train_items.shape} differ")
        for field in ("valid_items", "test_items"):
            if getattr(self, field).shape != (self.num_users,):
                raise ValueError(f"{field}: shape must be [num_users={self.num_users}]")

    @property
    def num_train(self) -> int:
        """Number of training interactions N."""
        return int(self.train_users.numel())

    def heldout(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out pairs of ``split`` (``"valid"`` or ``"test"``): ``(users [H], items [H])``."""
        if split not in ("valid", "test"):
            raise ValueError(f"split: expected 'valid' or 'test', got {split!r}")
        if split == "test" and self.test_pairs is not None:
            return self.test_pairs
        per_user = self.valid_items if split == "valid" else self.test_items
        users = torch.nonzero(per_user >= 0).flatten()
        return users, per_user[users]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split data set to ``path`` (a ``.pt`` file) that
        :func:`~hdccf_triton.data.load_dataset` reads back without parsing, e.g. on a machine
        without polars (see the module docstring)."""
        return save_dataset(self, path)

    def describe(self) -> str:
        """A few lines of statistics (Table 2 style)."""
        s = self.stats
        lines = [
            f"{self.name}: {self.num_users:,} users, {self.num_items:,} items, "
            f"{s.get('num_interactions', self.num_train):,} interactions "
            f"(density {s.get('density', float('nan')):.3%})",
            f"  source {s.get('source', '?')} (format {s.get('format', '?')}); "
            f"{s.get('raw_rows', 0):,} rows read, {s.get('duplicates_dropped', 0):,} duplicates dropped, "
            + (f"filters {s['filters']}" if "filters" in s else
               f"{s.get('items_removed', 0):,} items with < {s.get('min_item_interactions', '?')} "
               f"interactions removed ({s.get('interactions_removed', 0):,} interactions)"),
            f"  split {s.get('split', '?')}: train {self.num_train:,}, valid {s.get('num_valid', 0):,}, "
            f"test {s.get('num_test', 0):,}; {s.get('users_train_only', 0):,} users kept whole in train",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the saved file

MAGIC = "hdccf_triton.Dataset"
VERSION = 1
_TENSORS = ("train_users", "train_items", "valid_items", "test_items")


def _ids(ids: np.ndarray | None) -> Any:
    """Original ids in a form ``weights_only`` loading accepts: a tensor, a list of str, or None."""
    if ids is None:
        return None
    if np.issubdtype(ids.dtype, np.integer):
        return torch.tensor(ids, dtype=torch.int64)
    return [str(x) for x in ids]


def _from_ids(ids: Any) -> np.ndarray | None:
    if ids is None:
        return None
    return ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=object)


def save_dataset(ds: Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to ``path`` (parents created) atomically, with a checksum; returns the path.

    Raises:
        OSError: ``path`` cannot be written (the message names it; nothing is left behind).
    """
    path = Path(path).expanduser()
    payload = {"magic": MAGIC, "version": VERSION, "name": ds.name, "num_users": ds.num_users,
               "num_items": ds.num_items, "stats": dict(ds.stats),
               "test_pairs": None if ds.test_pairs is None else tuple(t.cpu() for t in ds.test_pairs),
               "user_ids": _ids(ds.user_ids), "item_ids": _ids(ds.item_ids)}
    payload.update({name: getattr(ds, name).cpu() for name in _TENSORS})
    return save_checked(payload, path)


def _check(path: Path, stats: dict, asked: dict[str, Any]) -> None:
    """ValueError when a setting asked for differs from the one the file was split with."""
    saved_split = stats.get("split", "?")
    split = asked["split"]  # one of the three modes: load_dataset checked it
    if split != "auto" and split != saved_split and not (split == "random" and "random" in saved_split):
        raise ValueError(f"split={split!r}: {path} holds a {saved_split!r} split; load the source data "
                         "to split it differently")
    if "random" in saved_split and stats.get("split_seed") not in (None, asked["seed"]):
        raise ValueError(f"seed={asked['seed']}: {path} holds the random split of seed {stats['split_seed']}; "
                         "save one file per seed or load the source data")
    if stats.get("filters", "").startswith("not applied"):
        return  # a given split is never filtered, whatever was asked
    for arg in ("min_item_interactions", "min_user_interactions"):
        saved = stats.get(arg, 0 if arg == "min_user_interactions" else None)
        if saved is not None and saved != asked[arg]:
            raise ValueError(f"{arg}={asked[arg]}: {path} was filtered with {arg}={saved}")


def read_saved_dataset(path: Path, **asked: Any) -> Dataset:
    """The :class:`Dataset` saved in ``path``; ``asked``: split, seed, min_item/min_user_interactions."""
    payload = load_checked(path, what="data set saved by Dataset.save")
    if not isinstance(payload, dict) or payload.get("magic") != MAGIC:
        raise ValueError(f"{path}: not a data set saved by Dataset.save")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: saved data set version {payload.get('version')}, this library reads {VERSION}")
    stats = dict(payload["stats"])
    _check(path, stats, asked)
    stats["saved_file"] = str(path)
    test_pairs = payload["test_pairs"]
    return Dataset(name=payload["name"], num_users=payload["num_users"], num_items=payload["num_items"],
                   **{name: payload[name] for name in _TENSORS},
                   test_pairs=None if test_pairs is None else tuple(test_pairs),
                   user_ids=_from_ids(payload["user_ids"]), item_ids=_from_ids(payload["item_ids"]), stats=stats)
