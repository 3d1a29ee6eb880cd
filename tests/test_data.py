"""Loading, filtering and splitting interaction files; the verified download."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("polars")
pytest.importorskip("tqdm")

from hdccf_triton import data  # noqa: E402
from hdccf_triton.data import remote  # noqa: E402
from hdccf_triton.data import Dataset, DownloadError, leave_one_out, load_dataset  # noqa: E402

# CI clones the repository with shared/ beside it.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} is absent (MovieLens copies are never committed)")
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# A small ratings.dat: user 1 has a timestamp tie (items 20 and 30 at t=300: file order
# decides, 30 is later); (1, 10) is repeated; item 99 has one rating (filtered with
# min_item_interactions=2); user 3 keeps 2 interactions (< 3: all in train).
ML1M = """\
1::10::5::100
1::20::3::300
1::30::4::300
1::10::1::50
2::20::4::10
2::10::2::20
2::30::5::5
2::99::5::1
3::10::3::7
3::20::3::8
4::30::1::1
4::20::1::2
4::10::1::3
"""


def _toy(tmp_path: Path, **kwargs) -> Dataset:
    return load_dataset(_write(tmp_path / "ratings.dat", ML1M), min_item_interactions=2, **kwargs)


def _per_user(ds: Dataset) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for u, i in zip(ds.train_users.tolist(), ds.train_items.tolist()):
        out.setdefault(u, []).append(i)
    return out


def test_ml1m_format_preprocessing_and_chronological_split(tmp_path):
    ds = _toy(tmp_path)
    assert (ds.num_users, ds.num_items) == (4, 3)
    assert ds.user_ids.tolist() == [1, 2, 3, 4] and ds.item_ids.tolist() == [10, 20, 30]  # sorted ids
    assert ds.stats["duplicates_dropped"] == 1 and ds.stats["items_removed"] == 1
    assert ds.stats["num_interactions"] == 11 and ds.stats["split"] == "chronological"
    # user 1 (dense 0): 10@100 (first copy kept), 20@300, 30@300 -> test 30 (tie: file order), valid 20
    # user 2 (dense 1): 30@5, 20@10, 10@20 (99 filtered) -> test 10, valid 20
    assert ds.test_items.tolist() == [2, 0, -1, 0]
    assert ds.valid_items.tolist() == [1, 1, -1, 1]
    assert _per_user(ds) == {0: [0], 1: [2], 2: [0, 1], 3: [2]}
    assert ds.train_users.dtype == ds.train_items.dtype == torch.int64
    assert ds.num_train == 5 and ds.stats["users_train_only"] == 1
    assert "4 users, 3 items" in ds.describe()
    users, items = ds.heldout("test")
    assert users.tolist() == [0, 1, 3] and items.tolist() == [2, 0, 0]


def test_random_split_is_seeded_and_keeps_every_interaction(tmp_path):
    a, b = _toy(tmp_path, split="random", seed=1), _toy(tmp_path, split="random", seed=1)
    assert torch.equal(a.test_items, b.test_items) and torch.equal(a.train_items, b.train_items)
    splits = {tuple(_toy(tmp_path, split="random", seed=s).test_items.tolist()) for s in range(8)}
    assert len(splits) > 1
    for ds in (a, _toy(tmp_path)):
        known = {(u, i) for u, i in zip(ds.train_users.tolist(), ds.train_items.tolist())}
        for per_user in (ds.valid_items, ds.test_items):
            known |= {(u, i) for u, i in enumerate(per_user.tolist()) if i >= 0}
        assert len(known) == 11  # train, valid and test partition the interactions


def test_leave_one_out_against_a_loop():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 400)
    key = rng.integers(0, 20, 400).astype(np.float64)  # many ties: file order breaks them
    order, from_end = leave_one_out(users, key, 30)
    for u in range(30):
        idx = [n for n in range(400) if users[n] == u]
        idx.sort(key=lambda n: (key[n], n))
        got = {int(order[k]): int(from_end[k]) for k in range(400) if users[order[k]] == u}
        for pos, n in enumerate(idx):
            back = len(idx) - 1 - pos
            assert got[n] == (back if len(idx) >= 3 and back < 2 else -1)


def test_generic_delimited_without_time_warns_and_splits_randomly(tmp_path):
    rows = "".join(f"{u}\t{i}\t4\n" for u in range(1, 6) for i in range(1, 8) if (u + i) % 3)
    path = _write(tmp_path / "r.tsv", rows)
    with pytest.warns(UserWarning, match="not chronological"):
        ds = load_dataset(path, min_item_interactions=0)
    assert ds.stats["split"] == "random" and ds.stats["format"] == "delimited"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit split='random' does not warn
        again = load_dataset(path, min_item_interactions=0, split="random")
    assert torch.equal(again.test_items, ds.test_items)
    with pytest.raises(ValueError, match="no timestamps"):
        load_dataset(path, min_item_interactions=0, split="chronological")


def test_generic_csv_with_header_and_string_ids(tmp_path):
    text = "timestamp,user_id,item_id\n5,bob,x\n1,bob,y\n3,bob,z\n2,amy,x\n9,amy,y\n"
    ds = load_dataset(_write(tmp_path / "log.csv", text), min_item_interactions=0)
    assert ds.user_ids.tolist() == ["amy", "bob"] and ds.item_ids.tolist() == ["x", "y", "z"]
    assert ds.test_items.tolist() == [-1, 0]  # bob: y@1, z@3, x@5 -> test x, valid z
    assert ds.valid_items.tolist() == [-1, 2]


def test_sasrec_format_uses_file_order(tmp_path):
    text = "1 5\n1 3\n1 4\n1 1\n2 3\n2 5\n2 4\n"
    path = tmp_path / "ml-1m.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    ds = load_dataset(path, min_item_interactions=0)
    assert ds.stats["format"] == "sasrec" and ds.stats["split"] == "chronological"
    # items 1,3,4,5 -> 0,1,2,3; user 1: 5,3,4,1 -> valid 4 (2), test 1 (0)
    assert ds.test_items.tolist() == [0, 2] and ds.valid_items.tolist() == [2, 3]
    assert _per_user(ds) == {0: [3, 1], 1: [1]}


def test_ml100k_format(tmp_path):
    text = "".join(f"{u}\t{i}\t3\t{100 * u + i}\n" for u in (1, 2) for i in (7, 8, 9))
    ds = load_dataset(_write(tmp_path / "u.data", text), min_item_interactions=0)
    assert ds.stats["format"] == "ml-100k" and ds.test_items.tolist() == [2, 2]


def test_lightgcn_format_keeps_the_given_test_set(tmp_path):
    _write(tmp_path / "g" / "train.txt", "0 1 2 3 4\n1 0 2 4\n2 3\n")
    _write(tmp_path / "g" / "test.txt", "0 0\n1 1 3\n2 4\n")
    a = load_dataset(tmp_path / "g", min_item_interactions=0, seed=5)
    b = load_dataset(tmp_path / "g", min_item_interactions=0, seed=5)
    assert a.stats["format"] == "lightgcn" and a.test_items.tolist() == [-1, -1, -1]
    users, items = a.heldout("test")
    assert users.tolist() == [0, 1, 1, 2] and items.tolist() == [0, 1, 3, 4]
    assert torch.equal(a.valid_items, b.valid_items)
    assert a.valid_items[0] in (1, 2, 3, 4) and a.valid_items[1] in (0, 2, 4) and a.valid_items[2] == -1
    assert a.num_train == 8 - 2


def test_zip_archive(tmp_path):
    path = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", ML1M)
    ds = load_dataset(path, min_item_interactions=2)
    assert ds.num_users == 4 and ds.test_items.tolist() == [2, 0, -1, 0]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("ratings.dat", "1::2::3::4\n1::2::3\n", r"line 2"),
        ("ratings.dat", "1::2::3::4\n1::x::3::4\n", r"line 2: item id 'x'"),
        ("ratings.dat", "1::2::3::4\n\n1::3::3::4::9\n", r"line 3"),
        ("ratings.dat", "1::2::3::4\n2::2::3::later\n", r"line 2: timestamp"),
        ("u.data", "1\t2\t3\t4\n5\t6\n", r"line 2"),
        ("r.tsv", "1\t2\n3\n", r"line 2"),
        ("ratings.dat", "\n\n", r"empty"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, match):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_malformed_lightgcn_line(tmp_path):
    _write(tmp_path / "g" / "train.txt", "0 1 2\n\n1 x\n")
    _write(tmp_path / "g" / "test.txt", "0 3\n1 4\n")
    with pytest.raises(ValueError, match=r"train.txt, line 3: item id 'x'"):
        load_dataset(tmp_path / "g")
    _write(tmp_path / "g" / "train.txt", "0 1 2\n1 2\n")
    with pytest.raises(ValueError, match="no time information"):
        load_dataset(tmp_path / "g", split="chronological", min_item_interactions=0)


def test_bad_arguments_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nope.tsv")
    with pytest.raises(TypeError, match="name_or_path"):
        load_dataset(42)
    with pytest.raises(TypeError, match="min_item_interactions"):
        load_dataset(tmp_path, min_item_interactions=-1)
    with pytest.raises(ValueError, match="split"):
        _toy(tmp_path, split="temporal")
    with pytest.raises(ValueError, match="format"):
        load_dataset(tmp_path, format="parquet")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(ValueError, match="bad.gz"):
        load_dataset(tmp_path / "bad.gz")
    (tmp_path / "ml-1m.zip").write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="ml-1m.zip"):
        load_dataset(tmp_path / "ml-1m.zip")
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_dataset("ml-1m-sasrec", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="data_dir="):
        load_dataset("gowalla", tmp_path / "empty")


# --------------------------------------------------------------------------- download


def _fake_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", ML1M)
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base url, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet, but remember what was asked
            log.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, log
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("HDCCF_DATA_DIR", str(path))
    monkeypatch.setattr(remote, "_licence_shown", False)  # the notice is printed once a process
    return path


def _point_at(monkeypatch, url: str, payload: bytes) -> None:
    spec = data.RemoteArchive(url, hashlib.sha256(payload).hexdigest(), "ml-1m.zip", "ml-1m/ratings.dat")
    monkeypatch.setitem(data.REMOTE, "ml-1m", spec)


def test_download_verifies_writes_atomically_and_shows_licence_once(server, cache, monkeypatch, capsys):
    base, root, log = server
    payload = _fake_zip()
    (root / "ml-1m.zip").write_bytes(payload)
    _point_at(monkeypatch, f"{base}/ml-1m.zip", payload)
    ds = load_dataset("ml-1m", min_item_interactions=2, progress=False)
    assert ds.num_users == 4 and (cache / "ml-1m.zip").read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == ["ml-1m.zip"]  # no partial file left
    out = capsys.readouterr().out
    assert "research use" in out and "redistribute" in out
    load_dataset("ml-1m", min_item_interactions=2, progress=False)  # from the cache now
    assert log.count("/ml-1m.zip") == 1 and "research use" not in capsys.readouterr().out


def test_download_from_file_url(tmp_path, cache, monkeypatch):
    payload = _fake_zip()
    src = tmp_path / "mirror.zip"
    src.write_bytes(payload)
    _point_at(monkeypatch, src.as_uri(), payload)
    assert data.download("ml-1m", progress=False).read_bytes() == payload


def test_corrupted_download_leaves_nothing(server, cache, monkeypatch):
    base, root, _ = server
    payload = _fake_zip()
    (root / "ml-1m.zip").write_bytes(payload[:-10] + b"corrupted!")
    _point_at(monkeypatch, f"{base}/ml-1m.zip", payload)
    with pytest.raises(DownloadError, match="SHA-256") as err:
        load_dataset("ml-1m", progress=False)
    assert "data_dir=" in str(err.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_failed_download_leaves_nothing_and_says_where_to_point(server, cache, monkeypatch, tmp_path):
    base, _, _ = server
    _point_at(monkeypatch, f"{base}/missing.zip", b"")  # the server answers 404
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DownloadError, match="could not download") as err:
        load_dataset("ml-1m", empty, progress=False)
    assert "data_dir=" in str(err.value)
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="data_dir="):
        load_dataset("ml-1m", download=False)


def test_data_dir_is_never_written(tmp_path):
    _write(tmp_path / "d" / "ratings.dat", ML1M)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "d").rglob("*"))
    ds = load_dataset("ml-1m", tmp_path / "d", min_item_interactions=2, download=False)
    assert ds.num_users == 4
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "d").rglob("*")) == before


# --------------------------------------------------------------------------- the shared copies


def test_ml1m_sasrec_copy_reproduces_table_2():
    _shared("ml-1m-sasrec/ml-1m.txt.gz")
    ds = load_dataset("ml-1m", SHARED, download=False, verbose=True)
    assert ds.stats["format"] == "sasrec" and ds.stats["split"] == "chronological"
    assert (ds.num_users, ds.num_items, ds.stats["num_interactions"]) == (6040, 3416, 999_611)
    assert ds.stats["items_removed"] == 0
    assert ds.num_train == 999_611 - 2 * 6040
    assert (ds.valid_items >= 0).all() and (ds.test_items >= 0).all()
    # SASRec ids k -> k - 1; its first user's last two items are the held-out ones.
    assert ds.item_ids[:3].tolist() == [1, 2, 3]


def test_ml1m_svdapprox_copy_filters_to_table_2():
    _shared("ml-1m-svdapprox/ratings.tsv.gz")
    with pytest.warns(UserWarning, match="not chronological"):
        ds = load_dataset("ml-1m-svdapprox", SHARED, verbose=True)
    assert ds.stats["raw_rows"] == 1_000_209
    # 290 items have fewer than 5 ratings (598 ratings): Table 2's 3,416 items / 999,611.
    assert (ds.stats["items_removed"], ds.stats["interactions_removed"]) == (290, 598)
    assert (ds.num_users, ds.num_items, ds.stats["num_interactions"]) == (6040, 3416, 999_611)


def test_gowalla_lightgcn_copy():
    _shared("gowalla-lightgcn/train.txt")
    ds = load_dataset("gowalla", SHARED, verbose=True)
    assert (ds.num_users, ds.num_items) == (29_858, 40_981)
    assert ds.test_pairs[0].numel() == 217_242 and ds.num_train == 810_128 - 29_858
    assert (ds.valid_items >= 0).all()
