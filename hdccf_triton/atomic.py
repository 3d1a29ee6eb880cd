"""Files written whole or not at all, and torch files that carry a checksum verified on load.

:func:`atomic_write` writes into a temporary file in the target's folder, flushes and fsyncs
it, and renames it over the target (``os.replace``): a reader sees the old file or the new
one, never a torn one, and the temporary is removed on any failure (``KeyboardInterrupt``
included). :func:`save_checked` puts a SHA-256 of the ``torch.save`` payload in front of it,
and :func:`load_checked` verifies it, so a truncated or bit-flipped checkpoint or saved data
set is refused with an error that names the file instead of loading wrong numbers.

File layout of :func:`save_checked`: the line ``HDCCF-SHA256 <64 hex digits>\\n``, then the
bytes ``torch.save`` wrote. Files without that line (written before checksums existed) are
loaded unverified, with a warning. Only the standard library and torch are imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["CorruptFileError", "atomic_write", "check_writable", "load_checked", "read_json", "save_checked",
           "write_json"]

_HEADER = b"HDCCF-SHA256 "
_DIGEST = 64  # hex digits of a SHA-256


class CorruptFileError(ValueError):
    """A file that is empty, truncated, altered or not of the expected kind (the message names it)."""


def _reason(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be written: a parent that is a file, else the error's own words."""
    for parent in path.parents:
        if parent.exists():
            return str(exc.strerror or exc) if parent.is_dir() else f"{parent} is not a folder"
    return str(exc.strerror or exc)


def _cannot_write(path: Path, exc: OSError) -> OSError:
    return type(exc)(exc.errno, f"cannot write {path}: {_reason(path, exc)}")


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parents created) all at once; returns the path.

    Raises:
        OSError: the folder cannot be created or written, or ``path`` is a folder; the message
            names ``path`` and nothing is left behind.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(21, f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail now, not after hours of work, when the file ``path`` could not be written later.

    Creates the parent folders and a probe file beside ``path`` (removed at once).

    Raises:
        OSError: naming ``what`` (e.g. the flag ``--out``) and the path.
    """
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise type(exc)(exc.errno, f"{what}: cannot write {path} ({_reason(path, exc)})") from exc
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """``json.dumps(obj, indent=indent)`` written atomically to ``path``."""
    return atomic_write(path, json.dumps(obj, indent=indent).encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a file that is empty, truncated or not JSON raises CorruptFileError naming it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = "is empty" if not text.strip() else f"is not valid JSON (truncated or corrupt? {exc})"
        raise CorruptFileError(f"{path} {what}") from exc


def save_checked(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, behind a SHA-256 of its bytes (:func:`load_checked`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return atomic_write(path, _HEADER + digest + b"\n" + payload)


def load_checked(path: str | os.PathLike, *, what: str = "file", map_location: Any = "cpu",
                 weights_only: bool = True) -> Any:
    """The object :func:`save_checked` wrote to ``path``, after verifying its checksum.

    Args:
        what: what the file should be ("checkpoint", "saved data set"), for the messages.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: empty, truncated, altered (checksum mismatch) or not such a file;
            the message names the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    advice = "re-run or delete it"
    if not raw:
        raise CorruptFileError(f"{path} is empty (0 bytes), not a {what}: {advice}")
    if raw.startswith(_HEADER):
        start = len(_HEADER) + _DIGEST + 1
        digest, payload = raw[len(_HEADER) : start - 1], raw[start:]
        if raw[start - 1 : start] != b"\n" or hashlib.sha256(payload).hexdigest().encode("ascii") != digest:
            raise CorruptFileError(f"{path} is corrupt (checksum mismatch; truncated or altered): {advice}")
    elif raw.startswith(b"PK\x03\x04"):  # torch's zip format without our header: an older file
        warnings.warn(f"{path}: {what} without a checksum (written before checksums existed); loaded unverified",
                      stacklevel=2)
        payload = raw
    else:
        raise CorruptFileError(f"{path}: not a {what} (unknown format): {advice}")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # torch raises many types for bytes that are not its own
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CorruptFileError(f"{path}: not a readable {what} ({type(exc).__name__}: {first[:200]}): "
                               f"{advice}") from exc
