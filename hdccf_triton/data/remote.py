"""Downloads of the public archives (``ml-1m``, ``ml-100k``), verified and atomic.

An archive goes to ``$HDCCF_DATA_DIR``, else ``~/.cache/hdccf_triton`` (:func:`data_cache_dir`);
it is streamed into a temporary file, verified by SHA-256 and only then renamed into place.
Nothing else is ever written anywhere. The MovieLens licence is printed before the first
download of a process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["DownloadError", "GROUPLENS_LICENCE", "REMOTE", "RemoteArchive", "data_cache_dir", "download"]


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
