"""Dataset.save and loading the saved file back: same split, checked settings, no polars needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("polars")

from hdccf_triton.data import Dataset, load_dataset  # noqa: E402

FIELDS = ("train_users", "train_items", "valid_items", "test_items")
RATINGS = "".join(f"{u}::{i}::3::{10 * u + i}\n" for u in range(1, 9) for i in range(1, 12) if (u * i) % 5)


def _assert_same(a: Dataset, b: Dataset) -> None:
    assert (a.name, a.num_users, a.num_items) == (b.name, b.num_users, b.num_items)
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.test_pairs is None) == (b.test_pairs is None)
    if a.test_pairs is not None:
        assert all(torch.equal(x, y) for x, y in zip(a.test_pairs, b.test_pairs))
    assert np.array_equal(a.user_ids, b.user_ids) and np.array_equal(a.item_ids, b.item_ids)
    assert {k: v for k, v in b.stats.items() if k != "saved_file"} == a.stats


@pytest.fixture
def ratings(tmp_path) -> Path:
    path = tmp_path / "ratings.dat"
    path.write_text(RATINGS)
    return path


def test_round_trip_keeps_the_split(ratings, tmp_path):
    ds = load_dataset(ratings, min_item_interactions=2)
    saved = ds.save(tmp_path / "sub" / "ml.pt")
    back = load_dataset(saved, min_item_interactions=2)
    _assert_same(ds, back)
    assert back.stats["saved_file"] == str(saved) and back.stats["split"] == "chronological"
    _assert_same(ds, load_dataset(saved, format="saved", split="chronological", min_item_interactions=2))


def test_round_trip_of_string_ids_and_a_given_test_set(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("timestamp,user_id,item_id\n5,bob,x\n1,bob,y\n3,bob,z\n2,amy,x\n9,amy,y\n")
    ds = load_dataset(csv, min_item_interactions=0)
    _assert_same(ds, load_dataset(ds.save(tmp_path / "csv.pt"), min_item_interactions=0))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "train.txt").write_text("0 1 2 3 4\n1 0 2 4\n2 3\n")
    (tmp_path / "g" / "test.txt").write_text("0 0\n1 1 3\n2 4\n")
    lightgcn = load_dataset(tmp_path / "g", min_item_interactions=0, seed=5)
    back = load_dataset(lightgcn.save(tmp_path / "g.pt"), min_item_interactions=0, seed=5, split="random")
    _assert_same(lightgcn, back)


def test_settings_that_differ_from_the_saved_split_are_refused(ratings, tmp_path):
    chrono = load_dataset(ratings, min_item_interactions=2).save(tmp_path / "chrono.pt")
    with pytest.raises(ValueError, match="split='random'.*chronological"):
        load_dataset(chrono, split="random", min_item_interactions=2)
    with pytest.raises(ValueError, match="min_item_interactions=5.*min_item_interactions=2"):
        load_dataset(chrono)
    with pytest.raises(ValueError, match="min_user_interactions=3"):
        load_dataset(chrono, min_item_interactions=2, min_user_interactions=3)
    with pytest.raises(ValueError, match="split: expected"):
        load_dataset(chrono, split="temporal", min_item_interactions=2)
    shuffled = load_dataset(ratings, split="random", seed=3, min_item_interactions=2).save(tmp_path / "random.pt")
    assert load_dataset(shuffled, split="random", seed=3, min_item_interactions=2).stats["split_seed"] == 3
    with pytest.raises(ValueError, match="seed=4.*random split of seed 3"):
        load_dataset(shuffled, seed=4, min_item_interactions=2)


def test_files_that_are_not_saved_data_sets(tmp_path):
    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a data set saved by Dataset.save"), \
            pytest.warns(UserWarning, match="weights.pt: .* without a checksum .* loaded unverified"):
        load_dataset(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt: not a data set saved by Dataset.save"):
        load_dataset(garbage)


def test_a_saved_file_loads_without_polars(ratings, tmp_path):
    saved = load_dataset(ratings, min_item_interactions=2).save(tmp_path / "ml.pt")
    code = ("import sys; sys.modules['polars'] = None\n"  # any `import polars` now fails
            "from hdccf_triton.data import load_dataset\n"
            f"ds = load_dataset({str(saved)!r}, min_item_interactions=2)\n"
            "print(ds.num_users, ds.num_items, ds.num_train)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    ds = load_dataset(saved, min_item_interactions=2)
    assert out.stdout.split() == [str(ds.num_users), str(ds.num_items), str(ds.num_train)]
