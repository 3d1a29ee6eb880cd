"""Interaction data: download, parse, filter and split (leave-one-out).

One entry point, :func:`load_dataset`, turns a named data set or a file into a
:class:`Dataset` of dense 0-based ids and a leave-one-out split:

    >>> ds = load_dataset("ml-1m", data_dir="../shared/data")   # doctest: +SKIP
    >>> print(ds.describe())                                     # doctest: +SKIP

Formats (``format=`` forces one; otherwise it is guessed from the file name):

``"ml-1m"``      ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, or ``ml-1m.zip``.
``"ml-100k"``    ``u.data``: ``user \\t item \\t rating \\t timestamp``, or ``ml-100k.zip``.
``"sasrec"``     ``user item`` per line (space separated, optionally ``.gz``), each user's
                 lines in time order (SASRec's ``ml-1m.txt``): file order is time order.
``"lightgcn"``   a folder (or its ``train.txt``) with ``train.txt``/``test.txt``, one
                 ``user item item ...`` line per user; it comes pre-split.
``"delimited"``  any delimited file (tab, ``,``, ``;``, ``::`` or space; optionally
                 ``.gz``) with user and item columns and optional rating and timestamp
                 columns, in that order unless a header names them.
``"saved"``      a ``.pt`` file written by :meth:`Dataset.save`: the data set already
                 filtered and split, read without parsing (:mod:`hdccf_triton.dataset_file`).

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
test set (``Dataset.test_pairs``) and takes one validation item per user (with at least
3 training interactions) out of train by a seeded random choice.

Downloads (``ml-1m``, ``ml-100k``) go to ``$HDCCF_DATA_DIR``, else
``~/.cache/hdccf_triton``; they are written atomically and verified by SHA-256.
Nothing else is ever written anywhere.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

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


# --------------------------------------------------------------------------- downloads


@dataclasses.dataclass(frozen=True)
class RemoteArchive:
    """Where a public archive lives, its SHA-256, and the ratings file inside it."""

    url: str
    sha256: str
    filename: str
    member: str


#: The archives :func:`download` knows. Module-level so tests can point them elsewhere.
REMOTE: dict[str, RemoteArchive] = {
    "ml-1m": RemoteArchive(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        filename="ml-1m.zip",
        member="ml-1m/ratings.dat",
    ),
    "ml-100k": RemoteArchive(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        filename="ml-100k.zip",
        member="ml-100k/u.data",
    ),
}

GROUPLENS_LICENCE = """\
MovieLens data (GroupLens Research, University of Minnesota) -- usage licence, in short:
  * research use only; no commercial use without permission;
  * do not redistribute the data (no copies in packages, releases or public repositories)
    without separate permission;
  * acknowledge the data in publications: F. M. Harper and J. A. Konstan, "The MovieLens
    Datasets: History and Context", ACM TiiS 5(4), 2015.
The full terms are in the README inside the archive."""

_licence_shown = False


class DownloadError(RuntimeError):
    """A download failed or its content did not match the expected checksum."""


def data_cache_dir() -> Path:
    """The download cache: ``$HDCCF_DATA_DIR`` if set, else ``~/.cache/hdccf_triton``."""
    env = os.environ.get("HDCCF_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hdccf_triton"


def _show_licence_once() -> None:
    # The licence forbids redistribution; say so before the first download of a process.
    global _licence_shown
    if not _licence_shown:
        print(GROUPLENS_LICENCE, flush=True)
        _licence_shown = True


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    name: str,
    dest_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download the archive of data set ``name`` (a key of :data:`REMOTE`), once.

    The file goes to ``dest_dir`` (default :func:`data_cache_dir`) under its archive name.
    It is streamed into a temporary file in the same folder, checked against the SHA-256,
    and only then renamed into place (``os.replace``), so a failed or corrupted download
    leaves nothing behind. A file already there is checked and returned.

    Args:
        name: ``"ml-1m"`` or ``"ml-100k"``.
        dest_dir: target folder.
        url, sha256: override the registry entry (mirrors, tests).
        progress: show a tqdm progress bar.

    Returns:
        The path of the verified archive.

    Raises:
        ValueError: unknown ``name``.
        DownloadError: the download failed or the checksum did not match.
    """
    if name not in REMOTE:
        raise ValueError(f"name: no download known for {name!r}; known: {sorted(REMOTE)}")
    spec = REMOTE[name]
    url = url or spec.url
    sha256 = (sha256 or spec.sha256).lower()
    dest = Path(dest_dir).expanduser() if dest_dir is not None else data_cache_dir()
    target = dest / spec.filename
    if target.is_file():
        got = _sha256_file(target)
        if got != sha256:
            raise DownloadError(
                f"{target} exists but its SHA-256 is {got}, expected {sha256}; "
                "delete it to download again"
            )
        return target
    _show_licence_once()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the download folder {dest}: {exc}") from exc
    _fetch_verified(url, target, sha256, progress)
    return target


def _fetch_verified(url: str, target: Path, sha256: str, progress: bool) -> None:
    """Stream ``url`` to ``target`` through a temporary file; verify, then rename."""
    from tqdm.auto import tqdm  # optional dependency, only needed to download

    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name,
                      disable=not progress) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        got = digest.hexdigest()
        if got != sha256:
            raise DownloadError(
                f"download of {url} is corrupted: SHA-256 {got}, expected {sha256}; "
                "nothing was kept, try again"
            )
        os.replace(tmp, target)
    except DownloadError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, urllib.error.URLError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. KeyboardInterrupt: still leave no partial file
        raise


# --------------------------------------------------------------------------- the data set


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
        """Write the split data set to ``path`` (a ``.pt`` file) that :func:`load_dataset` reads back
        without parsing, e.g. on a machine without polars (see :mod:`hdccf_triton.dataset_file`)."""
        from .dataset_file import save_dataset

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
            f"{s.get('items_removed', 0):,} items with < {s.get('min_item_interactions', '?')} "
            f"interactions removed ({s.get('interactions_removed', 0):,} interactions)",
            f"  split {s.get('split', '?')}: train {self.num_train:,}, valid {s.get('num_valid', 0):,}, "
            f"test {s.get('num_test', 0):,}; {s.get('users_train_only', 0):,} users kept whole in train",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- parsing

_FORMATS = ("ml-1m", "ml-100k", "sasrec", "lightgcn", "delimited", "saved")
_ALIASES = {
    "user": {"user", "userid", "user_id", "uid", "users"},
    "item": {"item", "itemid", "item_id", "iid", "movieid", "movie_id", "movie", "items",
             "business_id", "location", "location_id", "poi"},
    "rating": {"rating", "ratings", "score", "value"},
    "timestamp": {"timestamp", "time", "ts", "unixtime", "unix_time", "datetime"},
}


@dataclasses.dataclass
class _Raw:
    """Parsed interactions before preprocessing (a polars frame in file order)."""

    frame: Any  # pl.DataFrame with user, item and maybe timestamp
    label: str
    fmt: str
    ordered: bool = False  # file order is time order (SASRec)
    test: Any = None  # pl.DataFrame of a given test set (LightGCN)


def _pl():
    import polars as pl  # optional dependency: only the loaders need it

    return pl


def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it is gzip; errors name the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    if not raw.strip():
        raise ValueError(f"{path}: file is empty")
    return raw


def _read_zip_member(path: Path, suffix: str) -> tuple[bytes, str]:
    """The member of zip ``path`` whose name ends with ``suffix``, and its label."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == suffix or n.endswith("/" + suffix)]
            if not names:
                raise ValueError(f"{path}: no {suffix} inside the zip")
            raw = zf.read(names[0])
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: not a readable zip file ({exc})") from exc
    label = f"{path}:{names[0]}"
    if not raw.strip():
        raise ValueError(f"{label}: file is empty")
    return raw, label


def _first_bad_line(raw: bytes, sep: str, nfields: int) -> tuple[int, str]:
    """Slow path, errors only: the first non-blank line with fewer or more fields."""
    for lineno, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
        if line.strip() and len(line.split(sep)) != nfields:
            return lineno, line
    return 0, ""


def _read_table(raw: bytes, label: str, sep: str) -> Any:
    """A frame of string columns, one row per line (blank lines dropped), plus ``line``."""
    pl = _pl()
    if len(sep) > 1:
        # polars splits on one byte only: translate e.g. '::' into a byte absent from the data.
        if b"\x1f" in raw:
            raise ValueError(f"{label}: contains byte 0x1f, cannot translate separator {sep!r}")
        raw, sep = raw.replace(sep.encode(), b"\x1f"), "\x1f"
    try:
        frame = pl.read_csv(io.BytesIO(raw), separator=sep, has_header=False, infer_schema=False,
                            quote_char=None, truncate_ragged_lines=False, encoding="utf8-lossy")
    except Exception as exc:  # polars raises ComputeError/NoDataError etc.; find the line
        first = raw.split(b"\n", 1)[0].decode("utf-8", "replace")
        lineno, line = _first_bad_line(raw, sep, len(first.split(sep)))
        if lineno:
            raise ValueError(f"{label}, line {lineno}: {line[:80]!r} has a different number of "
                             f"fields than line 1") from exc
        raise ValueError(f"{label}: cannot parse ({exc})") from exc
    frame = frame.with_row_index("line", offset=1)
    cols = [c for c in frame.columns if c != "line"]
    # Blank lines come back as all-null rows; they carry no data.
    return frame.filter(~pl.all_horizontal(pl.col(cols).is_null()))


def _require(frame: Any, label: str, col: str, what: str) -> None:
    """Raise naming the first line where ``col`` is missing."""
    pl = _pl()
    bad = frame.filter(pl.col(col).is_null())
    if bad.height:
        raise ValueError(f"{label}, line {bad['line'][0]}: missing {what}")


def _to_number(frame: Any, label: str, col: str, dtype: Any, what: str) -> Any:
    """Cast string column ``col`` to ``dtype``; a value that does not parse names its line."""
    pl = _pl()
    stripped = pl.col(col).str.strip_chars()
    out = frame.with_columns(stripped.cast(dtype, strict=False).alias(col + "#"))
    bad = out.filter(pl.col(col + "#").is_null() & pl.col(col).is_not_null())
    if bad.height:
        raise ValueError(f"{label}, line {bad['line'][0]}: {what} {bad[col][0]!r} is not a number")
    return out.drop(col).rename({col + "#": col})


def _select_columns(frame: Any, label: str, names: Sequence[str | None], *, int_ids: bool) -> Any:
    """Rename positional columns to user/item/rating/timestamp, check and cast them."""
    pl = _pl()
    data_cols = [c for c in frame.columns if c != "line"]
    need = [n for n in names if n is not None]
    if len(data_cols) < len(names):
        raise ValueError(
            f"{label}, line {frame['line'][0] if frame.height else 1}: expected "
            f"{len(names)} fields ({', '.join(n or '-' for n in names)}), found {len(data_cols)}"
        )
    mapping = {data_cols[k]: n for k, n in enumerate(names) if n is not None}
    frame = frame.select("line", *[pl.col(c).alias(n) for c, n in mapping.items()])
    for col in need:
        _require(frame, label, col, f"field '{col}'")
    for col in ("user", "item"):
        if int_ids:
            frame = _to_number(frame, label, col, pl.Int64, f"{col} id")
        else:  # generic files: integer ids when all parse, else opaque strings
            as_int = frame[col].str.strip_chars().cast(pl.Int64, strict=False)
            frame = frame.with_columns(as_int.alias(col) if as_int.null_count() == 0
                                       else pl.col(col).str.strip_chars())
    if "timestamp" in need:
        frame = _to_number(frame, label, "timestamp", pl.Float64, "timestamp")
    if "rating" in need:  # checked for well-formedness, then unused (implicit feedback)
        frame = _to_number(frame, label, "rating", pl.Float64, "rating").drop("rating")
    return frame


def _sniff_separator(first_line: str) -> str:
    for sep in ("::", "\t", ",", ";", "|"):
        if sep in first_line:
            return sep
    return " "


def _canonical(name: str) -> str | None:
    key = re.sub(r"[^a-z_]", "", name.strip().lower().split(":")[0])
    for canon, aliases in _ALIASES.items():
        if key in aliases:
            return canon
    return None


def _parse_delimited(raw: bytes, label: str, sep: str | None, columns: Sequence[str] | None,
                     header: bool | None) -> _Raw:
    """A generic delimited file: user, item, [rating], [timestamp]."""
    first = next((ln for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()), "")
    sep = sep or _sniff_separator(first)
    fields = [f.strip() for f in first.split(sep)]
    header_names = [_canonical(f) for f in fields]
    if header is None:  # a header is a first line that names the user or item column
        header = "user" in header_names or "item" in header_names
    frame = _read_table(raw, label, sep)
    if header:
        frame = frame.slice(1)
    if columns is not None:
        names = [_canonical(c) if _canonical(c) else None for c in columns]
    elif header:
        names = header_names
    else:
        names = ["user", "item", "rating", "timestamp"][: len(fields)]
    if "user" not in names or "item" not in names:
        raise ValueError(f"{label}: cannot find user and item columns (columns= names them)")
    if frame.height == 0:
        raise ValueError(f"{label}: no data rows")
    # Positional selection needs one entry per field up to the last used one.
    last = max(k for k, n in enumerate(names) if n is not None)
    names = list(names[: last + 1])
    for k, n in enumerate(names):  # a name used twice: keep the first
        if n is not None and n in names[:k]:
            names[k] = None
    return _Raw(_select_columns(frame, label, names, int_ids=False), label, "delimited")


def _parse_lightgcn_file(path: Path) -> Any:
    """``user item item ...`` lines as a frame of (line, user, item) pairs."""
    pl = _pl()
    raw = _read_bytes(path)
    label = str(path)
    if b"\x1f" in raw:
        raise ValueError(f"{label}: contains byte 0x1f")
    try:  # one field per line: 0x1f never occurs
        lines = pl.read_csv(io.BytesIO(raw), separator="\x1f", has_header=False, infer_schema=False,
                            quote_char=None, new_columns=["text"], encoding="utf8-lossy")
    except Exception as exc:
        raise ValueError(f"{label}: cannot parse ({exc})") from exc
    lines = lines.with_row_index("line", offset=1).filter(pl.col("text").str.strip_chars() != "")
    tokens = lines.with_columns(pl.col("text").str.extract_all(r"\S+").alias("tok"))
    pairs = tokens.select(
        "line", pl.col("tok").list.first().alias("user"), pl.col("tok").list.slice(1).alias("item")
    ).explode("item")
    pairs = _to_number(pairs, label, "user", pl.Int64, "user id")
    pairs = pairs.filter(pl.col("item").is_not_null())  # a user line without items
    return _to_number(pairs, label, "item", pl.Int64, "item id")


def _parse(path: Path, fmt: str, *, sep: str | None, columns: Sequence[str] | None,
           header: bool | None) -> _Raw:
    """Read ``path`` in format ``fmt`` into a :class:`_Raw`."""
    if fmt == "lightgcn":
        folder = path if path.is_dir() else path.parent
        train, test = folder / "train.txt", folder / "test.txt"
        for f in (train, test):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (the LightGCN format needs train.txt and test.txt)")
        return _Raw(_parse_lightgcn_file(train), str(folder), fmt, test=_parse_lightgcn_file(test))
    if path.suffix == ".zip":
        raw, label = _read_zip_member(path, "u.data" if fmt == "ml-100k" else "ratings.dat")
    else:
        raw, label = _read_bytes(path), str(path)
    if fmt == "ml-1m":
        frame = _select_columns(_read_table(raw, label, "::"), label,
                                ["user", "item", "rating", "timestamp"], int_ids=True)
        return _Raw(frame, label, fmt)
    if fmt == "ml-100k":
        frame = _select_columns(_read_table(raw, label, "\t"), label,
                                ["user", "item", "rating", "timestamp"], int_ids=True)
        return _Raw(frame, label, fmt)
    if fmt == "sasrec":
        frame = _select_columns(_read_table(raw, label, " "), label, ["user", "item"], int_ids=True)
        return _Raw(frame, label, fmt, ordered=True)
    return _parse_delimited(raw, label, sep, columns, header)


def _guess_format(path: Path) -> str:
    """The format of ``path`` from its name (and, for a zip, its members)."""
    if path.is_dir():
        if (path / "train.txt").is_file() and (path / "test.txt").is_file():
            return "lightgcn"
        raise ValueError(f"{path}: a folder is read only in the LightGCN format (train.txt + test.txt)")
    if path.suffix == ".pt":
        return "saved"
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name == "ratings.dat":
        return "ml-1m"
    if name == "u.data":
        return "ml-100k"
    if name == "ml-1m.txt":
        return "sasrec"
    if name in ("train.txt", "test.txt") and (path.parent / "test.txt").is_file():
        return "lightgcn"
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{path}: not a readable zip file ({exc})") from exc
        if any(m.endswith("ratings.dat") for m in members):
            return "ml-1m"
        if any(m.endswith("u.data") for m in members):
            return "ml-100k"
        raise ValueError(f"{path}: zip holds neither ratings.dat nor u.data")
    return "delimited"


# --------------------------------------------------------------------------- locating named sets

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


# --------------------------------------------------------------------------- preprocessing


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
    pl = _pl()
    dense = frame.select((pl.col(col).rank("dense") - 1).cast(pl.Int64))[col].to_numpy()
    originals = frame[col].unique().sort().to_numpy()
    return dense, originals


def _random_key(n: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64).numpy()


def _split_mode(split: str, raw: _Raw) -> str:
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
    pl = _pl()
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


def _build(raw: _Raw, name: str, *, seed: int, split: str, min_item: int, min_user: int) -> Dataset:
    """Filter, remap and split a parsed data set."""
    pl = _pl()
    stats: dict[str, Any] = {"source": raw.label, "format": raw.fmt, "min_item_interactions": min_item,
                             "min_user_interactions": min_user}
    frame = raw.frame.drop("line")
    if raw.test is not None:  # pre-split: filter and remap over train and test together
        # Train rows first, so a pair in both files counts as training (duplicates keep the first).
        frame = pl.concat([frame.select("user", "item").with_columns(pl.lit(True).alias("train")),
                           raw.test.select("user", "item").with_columns(pl.lit(False).alias("train"))])
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
    """Load, filter and split a data set (see the module docstring for the rules).

    Args:
        name_or_path: a name (``"ml-1m"``, ``"ml-100k"``, ``"ml-1m-sasrec"``,
            ``"ml-1m-svdapprox"``, ``"gowalla"``) or a path to a file or LightGCN folder.
            ``"ml-1m"`` looks in ``data_dir`` for ``ratings.dat``, ``ml-1m.zip``, then
            SASRec's ``ml-1m-sasrec/ml-1m.txt[.gz]``, then in the download cache, then
            downloads. ``"ml-100k"`` likewise with ``u.data``/``ml-100k.zip``.
        data_dir: folder holding local copies; read only, never written.
        seed: seed of the random choices (random split, LightGCN validation items).
        split: ``"auto"``, ``"chronological"`` or ``"random"``.
        min_item_interactions: items with fewer interactions are removed (paper: 5).
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
    if format is not None and format not in _FORMATS:
        raise ValueError(f"format: expected one of {_FORMATS}, got {format!r}")
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
    fmt = format or _guess_format(path)
    if fmt == "saved":
        from .dataset_file import read_saved_dataset

        ds = read_saved_dataset(path, split=split, seed=int(seed), min_item_interactions=int(min_item_interactions),
                                min_user_interactions=int(min_user_interactions))
        if verbose:
            print(ds.describe())
        return ds
    raw = _parse(path, fmt, sep=sep, columns=columns, header=header)
    ds = _build(raw, label, seed=int(seed), split=split,
                min_item=int(min_item_interactions), min_user=int(min_user_interactions))
    if verbose:
        print(ds.describe())
    return ds
