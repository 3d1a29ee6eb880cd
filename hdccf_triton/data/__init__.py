"""Interaction data: one entry point, :func:`load_dataset`, from a named set or a file to a split.

:func:`load_dataset` turns a named data set or a file into a :class:`Dataset` of dense 0-based
ids and a leave-one-out split:

    >>> ds = load_dataset("ml-1m", data_dir="../shared/data")   # doctest: +SKIP
    >>> print(ds.describe())                                     # doctest: +SKIP

The package, one job a module (each imports only those listed before it):

``dataset``  :class:`Dataset` and its one-file form (:meth:`Dataset.save`, read back as format
             ``"saved"`` without parsing and without polars);
``remote``   the archives of ``ml-1m``/``ml-100k``: :func:`download` into
             :func:`data_cache_dir`, verified by SHA-256, and the licence notice;
``formats``  the file formats, how one is guessed from a file name, and their parsers;
``split``    the preprocessing (duplicates, rare items and users, dense ids) and the
             leave-one-out split, :func:`leave_one_out`;
this module  locating a named set (in ``data_dir``, then the download cache, then by download)
             and :func:`load_dataset`.

polars (and tqdm, for downloads) are imported only when a file is parsed (downloaded), so
importing this package needs torch and numpy only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .dataset import Dataset, read_saved_dataset
from .formats import FORMATS, guess_format, parse
from .remote import REMOTE, DownloadError, RemoteArchive, data_cache_dir, download
from .split import build_dataset, leave_one_out

__all__ = [
    "Dataset",
    "DownloadError",
    "REMOTE",
    "RemoteArchive",
    "data_cache_dir",
    "download",
    "leave_one_out",
    "load_dataset",
]

_LOCAL = {
    # name -> candidate paths relative to data_dir, first found wins
    "ml-1m": ["ratings.dat", "ml-1m/ratings.dat", "ml-1m.zip", "ml-1m-sasrec/ml-1m.txt.gz",
              "ml-1m-sasrec/ml-1m.txt", "ml-1m.txt.gz", "ml-1m.txt"],
    "ml-100k": ["u.data", "ml-100k/u.data", "ml-100k.zip"],
    "ml-1m-sasrec": ["ml-1m-sasrec/ml-1m.txt.gz", "ml-1m-sasrec/ml-1m.txt", "ml-1m.txt.gz", "ml-1m.txt"],
    "ml-1m-svdapprox": ["ml-1m-svdapprox/ratings.tsv.gz", "ratings.tsv.gz"],
    "gowalla": ["gowalla-lightgcn", "gowalla", "train.txt"],
}


def _locate(name: str, data_dir: Path | None, allow_download: bool, progress: bool) -> Path:
    """Find named data set ``name``: in data_dir, then the cache, then by download."""
    candidates = _LOCAL[name]
    searched = []
    for root in [data_dir] if data_dir is not None else []:
        for rel in candidates:
            p = root / rel
            searched.append(str(p))
            if p.is_dir() and name == "gowalla" and (p / "train.txt").is_file():
                return p
            if p.is_file():
                return p.parent if name == "gowalla" else p
    if name in REMOTE:
        cache = data_cache_dir()
        for rel in (REMOTE[name].filename, REMOTE[name].member):
            if (cache / rel).is_file():
                return cache / rel
        if allow_download:
            try:
                return download(name, cache, progress=progress)
            except DownloadError as exc:
                raise DownloadError(
                    f"{exc}\nData set {name!r} was not found locally and could not be downloaded. "
                    f"Pass data_dir= pointing at a folder that holds one of {candidates}, "
                    f"or put {REMOTE[name].filename} into {cache} (or $HDCCF_DATA_DIR)."
                ) from exc
    hint = f"searched: {', '.join(searched)}" if searched else "no data_dir was given"
    raise FileNotFoundError(
        f"data set {name!r} not found ({hint}). Pass data_dir= pointing at a folder that holds "
        f"one of {candidates}" + (" or allow the download." if name in REMOTE else ".")
    )


def load_dataset(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    split: str = "auto",
    min_item_interactions: int = 5,
    min_user_interactions: int = 0,
    format: str | None = None,
    sep: str | None = None,
    columns: Sequence[str] | None = None,
    header: bool | None = None,
    download: bool = True,
    progress: bool = True,
    verbose: bool = False,
) -> Dataset:
    """Load, filter and split a data set (the rules: :mod:`.formats` and :mod:`.split`).

    Args:
        name_or_path: a name (``"ml-1m"``, ``"ml-100k"``, ``"ml-1m-sasrec"``,
            ``"ml-1m-svdapprox"``, ``"gowalla"``) or a path to a file or LightGCN folder.
            ``"ml-1m"`` looks in ``data_dir`` for ``ratings.dat``, ``ml-1m.zip``, then
            SASRec's ``ml-1m-sasrec/ml-1m.txt[.gz]``, then in the download cache, then
            downloads. ``"ml-100k"`` likewise with ``u.data``/``ml-100k.zip``.
        data_dir: folder holding local copies; read only, never written.
        seed: seed of the random choices (random split, LightGCN validation items).
        split: ``"auto"``, ``"chronological"`` or ``"random"``.
        min_item_interactions: items with fewer interactions are removed (paper: 5); not
            applied to a data set with a given test set (LightGCN format), nor is
            ``min_user_interactions``.
        min_user_interactions: users with fewer interactions are removed afterwards.
        format: one of ``"ml-1m"``, ``"ml-100k"``, ``"sasrec"``, ``"lightgcn"``,
            ``"delimited"``, ``"saved"``; guessed from the file name when None (``.pt``: saved).
        sep, columns, header: for ``"delimited"``: the separator (sniffed when None), the
            column names in file order (``user``, ``item``, ``rating``, ``timestamp``,
            anything else ignored) and whether line 1 is a header (detected when None).
        download: allow downloading ``ml-1m``/``ml-100k`` into :func:`data_cache_dir`.
        progress: progress bar while downloading.
        verbose: print :meth:`Dataset.describe`.

    Returns:
        A :class:`Dataset`.

    Raises:
        FileNotFoundError: no such file, or a named set not found and not downloadable.
        DownloadError: the download failed or was corrupted.
        ValueError: a malformed file (the message names the file and line) or bad argument.
        TypeError: an argument of the wrong type.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected a name or a path, got {type(name_or_path).__name__}")
    for arg, value in (("seed", seed), ("min_item_interactions", min_item_interactions),
                       ("min_user_interactions", min_user_interactions)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise TypeError(f"{arg}: expected a non-negative int, got {value!r}")
    if split not in ("auto", "chronological", "random"):
        raise ValueError(f"split: expected 'auto', 'chronological' or 'random', got {split!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"data_dir: {root} is not a folder")
    key = str(name_or_path)
    if isinstance(name_or_path, str) and key in _LOCAL:
        path = _locate(key, root, download, progress)
        label = key
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_absolute() and root is not None and (root / path).exists():
            path = root / path
        if not path.exists():
            raise FileNotFoundError(f"name_or_path: {path} does not exist and is not one of {sorted(_LOCAL)}")
        label = str(path)
    fmt = format or guess_format(path)
    if fmt == "saved":
        ds = read_saved_dataset(path, split=split, seed=int(seed), min_item_interactions=int(min_item_interactions),
                                min_user_interactions=int(min_user_interactions))
        if verbose:
            print(ds.describe())
        return ds
    raw = parse(path, fmt, sep=sep, columns=columns, header=header)
    ds = build_dataset(raw, label, seed=int(seed), split=split,
                min_item=int(min_item_interactions), min_user=int(min_user_interactions))
    if verbose:
        print(ds.describe())
    return ds
