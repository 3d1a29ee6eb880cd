"""Reading interaction files into one frame of (user, item[, timestamp]) rows, in file order.

Formats (``format=`` of :func:`~hdccf_triton.data.load_dataset` forces one; otherwise
:func:`guess_format` reads it from the file name):

``"ml-1m"``      ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, or ``ml-1m.zip``.
``"ml-100k"``    ``u.data``: ``user \\t item \\t rating \\t timestamp``, or ``ml-100k.zip``.
``"sasrec"``     ``user item`` per line (space separated, optionally ``.gz``), each user's
                 lines in time order (SASRec's ``ml-1m.txt``): file order is time order.
``"lightgcn"``   a folder (or its ``train.txt``) with ``train.txt``/``test.txt``, one
                 ``user item item ...`` line per user; it comes pre-split. A ``train.txt``
                 of that shape without its ``test.txt`` is an error naming the missing file.
``"delimited"``  any delimited file (tab, ``,``, ``;``, ``::`` or space; optionally
                 ``.gz``) with user and item columns and optional rating and timestamp
                 columns, in that order unless a header names them.
``"saved"``      a ``.pt`` file written by :meth:`Dataset.save`: the data set already
                 filtered and split, read without parsing (:mod:`hdccf_triton.data.dataset`).

Every parse error names the file and, where there is one, the line. polars is imported
only when a file is parsed (:func:`import_polars`), so importing this module does not need it.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

__all__ = ["FORMATS", "RawInteractions", "guess_format", "import_polars", "parse"]

#: The values of ``format=`` (``"saved"`` is read by :mod:`.dataset`, not parsed here).
FORMATS = ("ml-1m", "ml-100k", "sasrec", "lightgcn", "delimited", "saved")
_ALIASES = {
    "user": {"user", "userid", "user_id", "uid", "users"},
    "item": {"item", "itemid", "item_id", "iid", "movieid", "movie_id", "movie", "items",
             "business_id", "location", "location_id", "poi"},
    "rating": {"rating", "ratings", "score", "value"},
    "timestamp": {"timestamp", "time", "ts", "unixtime", "unix_time", "datetime"},
}


@dataclasses.dataclass
class RawInteractions:
    """Parsed interactions before preprocessing (a polars frame in file order)."""

    frame: Any  # pl.DataFrame with user, item and maybe timestamp
    label: str
    fmt: str
    ordered: bool = False  # file order is time order (SASRec)
    test: Any = None  # pl.DataFrame of a given test set (LightGCN)


def import_polars():
    """The polars module, imported on first use (importing the package must not need it)."""
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
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({type(exc).__name__}: {exc})") from exc
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
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable zip file ({type(exc).__name__}: {exc})") from exc
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
    pl = import_polars()
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
    pl = import_polars()
    bad = frame.filter(pl.col(col).is_null())
    if bad.height:
        raise ValueError(f"{label}, line {bad['line'][0]}: missing {what}")


def _to_number(frame: Any, label: str, col: str, dtype: Any, what: str) -> Any:
    """Cast string column ``col`` to ``dtype``; a value that does not parse names its line."""
    pl = import_polars()
    stripped = pl.col(col).str.strip_chars()
    out = frame.with_columns(stripped.cast(dtype, strict=False).alias(col + "#"))
    bad = out.filter(pl.col(col + "#").is_null() & pl.col(col).is_not_null())
    if bad.height:
        raise ValueError(f"{label}, line {bad['line'][0]}: {what} {bad[col][0]!r} is not a number")
    return out.drop(col).rename({col + "#": col})


def _select_columns(frame: Any, label: str, names: Sequence[str | None], *, int_ids: bool) -> Any:
    """Rename positional columns to user/item/rating/timestamp, check and cast them."""
    pl = import_polars()
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
                     header: bool | None) -> RawInteractions:
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
    return RawInteractions(_select_columns(frame, label, names, int_ids=False), label, "delimited")


def _parse_lightgcn_file(path: Path) -> Any:
    """``user item item ...`` lines as a frame of (line, user, item) pairs."""
    pl = import_polars()
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


def parse(path: Path, fmt: str, *, sep: str | None, columns: Sequence[str] | None,
           header: bool | None) -> RawInteractions:
    """Read ``path`` in format ``fmt`` into a :class:`RawInteractions`."""
    if fmt == "lightgcn":
        folder = path if path.is_dir() else path.parent
        train, test = folder / "train.txt", folder / "test.txt"
        for f in (train, test):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (the LightGCN format needs train.txt and test.txt)")
        return RawInteractions(_parse_lightgcn_file(train), str(folder), fmt, test=_parse_lightgcn_file(test))
    if path.suffix == ".zip":
        raw, label = _read_zip_member(path, "u.data" if fmt == "ml-100k" else "ratings.dat")
    else:
        raw, label = _read_bytes(path), str(path)
    if fmt == "ml-1m":
        frame = _select_columns(_read_table(raw, label, "::"), label,
                                ["user", "item", "rating", "timestamp"], int_ids=True)
        return RawInteractions(frame, label, fmt)
    if fmt == "ml-100k":
        frame = _select_columns(_read_table(raw, label, "\t"), label,
                                ["user", "item", "rating", "timestamp"], int_ids=True)
        return RawInteractions(frame, label, fmt)
    if fmt == "sasrec":
        frame = _select_columns(_read_table(raw, label, " "), label, ["user", "item"], int_ids=True)
        return RawInteractions(frame, label, fmt, ordered=True)
    return _parse_delimited(raw, label, sep, columns, header)


def _looks_like_lightgcn(path: Path, lines: int = 200) -> bool:
    """Whether the first lines of ``path`` are LightGCN's: integer tokens only, with lines of
    different lengths or longer than the four fields of a delimited ratings file."""
    try:
        with open(path, "rb") as f:
            head = [f.readline() for _ in range(lines)]
    except OSError:
        return False
    counts = set()
    for line in head:
        tokens = line.split()
        if not tokens:
            continue
        if not all(t.isdigit() for t in tokens):
            return False
        counts.add(len(tokens))
    return len(counts) > 1 or max(counts, default=0) > 4


def guess_format(path: Path) -> str:
    """The format of ``path`` from its name (and, for a zip, its members)."""
    if path.is_dir():
        if (path / "train.txt").is_file() and (path / "test.txt").is_file():
            return "lightgcn"
        for present, missing in (("train.txt", "test.txt"), ("test.txt", "train.txt")):
            if (path / present).is_file():
                raise FileNotFoundError(f"{path / missing}: missing (the LightGCN format needs train.txt and "
                                        "test.txt)")
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
    if name in ("train.txt", "test.txt"):
        companion = path.parent / ("test.txt" if name == "train.txt" else "train.txt")
        if companion.is_file():
            return "lightgcn"
        if _looks_like_lightgcn(path):
            raise FileNotFoundError(
                f"{path} is in the LightGCN format (one 'user item item ...' line per user), which comes "
                f"as train.txt and test.txt together, but {companion} is missing; put it beside, or pass "
                "format='delimited' to read this file as (user, item, rating, timestamp) rows")
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
