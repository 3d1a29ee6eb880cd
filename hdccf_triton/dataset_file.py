"""A split data set saved to one file, read back without parsing (and without polars).

:meth:`Dataset.save` writes the filtered, remapped and split interactions with
``torch.save``; :func:`~hdccf_triton.data.load_dataset` reads such a file (suffix ``.pt``, or
``format="saved"``) with ``torch.load(weights_only=True)``. The file carries the split, so
it is the way to train on a machine that has torch but not the loaders' polars (a GPU box
without network) on exactly the split made here:

    >>> load_dataset("ml-1m", data_dir="../shared/data").save("runs/ml1m.pt")  # doctest: +SKIP
    >>> ds = load_dataset("runs/ml1m.pt")                                        # doctest: +SKIP

The settings that made the split (split mode, its seed for a random split, the minimum
interaction counts) are checked against the ones asked for, so a saved file cannot stand in
silently for a different split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .data import Dataset

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
    """Write ``ds`` to ``path`` (parents created); returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"magic": MAGIC, "version": VERSION, "name": ds.name, "num_users": ds.num_users,
               "num_items": ds.num_items, "stats": dict(ds.stats),
               "test_pairs": None if ds.test_pairs is None else tuple(t.cpu() for t in ds.test_pairs),
               "user_ids": _ids(ds.user_ids), "item_ids": _ids(ds.item_ids)}
    payload.update({name: getattr(ds, name).cpu() for name in _TENSORS})
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


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
    for arg in ("min_item_interactions", "min_user_interactions"):
        saved = stats.get(arg, 0 if arg == "min_user_interactions" else None)
        if saved is not None and saved != asked[arg]:
            raise ValueError(f"{arg}={asked[arg]}: {path} was filtered with {arg}={saved}")


def read_saved_dataset(path: Path, **asked: Any) -> Dataset:
    """The :class:`Dataset` saved in ``path``; ``asked``: split, seed, min_item/min_user_interactions."""
    from .data import Dataset

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not its own
        raise ValueError(f"{path}: not a data set saved by Dataset.save ({type(exc).__name__}: {exc})") from exc
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
