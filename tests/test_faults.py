"""Fault injection (issue 21): signals at every write point, two runs on one folder, truncated,
bit-flipped and empty files of every kind the project reads, unwritable outputs, and the flag table.

Each case asserts the exact outcome: a clear error naming the file or flag, or a correct result,
and the state the folder is left in. Runs are short (a synthetic data set, 8-dim embeddings) and
mostly in-process (the scripts' ``main``); a subprocess only where the fault needs one (a second
process, a file-size limit).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("polars")

from hdccf_triton.atomic import atomic_write, load_checked, read_json, save_checked  # noqa: E402
from hdccf_triton.data import load_dataset  # noqa: E402
from test_train_example import load_example, synthetic_ratings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train_ml1m.py"
TUNE = REPO / "examples" / "tune_prior.py"


@pytest.fixture(scope="module")
def train():
    return load_example("train_ml1m")


@pytest.fixture(scope="module")
def tune():
    return load_example("tune_prior")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_ratings(tmp_path_factory.mktemp("data") / "ratings.tsv")


def flags(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--dataset", str(data), "--min-item-interactions", "1", "-M", "32", "--dim", "8", "--threads", "1",
            "--no-progress", "--epochs", "2", "--max-batches", "4", "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def finished(train, data, tmp_path_factory) -> Path:
    """A finished run's folder (best.pt and results.json), to be copied, never changed."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train.main(flags(data, run))
    return run


def copy_run(finished: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for f in finished.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    result = json.loads((to / "results.json").read_text())
    result["checkpoint"] = str(to / "best.pt")  # the copy points at its own checkpoint
    (to / "results.json").write_text(json.dumps(result, indent=1))
    return to


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".probe")))


def assert_consistent(result: dict, run: Path, cwd: Path | None = None) -> None:
    """The JSON names a checkpoint this run wrote, of the epoch it calls best (``cwd``: where the run ran)."""
    assert result["best_epoch"] >= 1 and len(result["history"]) >= result["best_epoch"]
    state = load_checked((cwd or Path.cwd()) / result["checkpoint"], what="checkpoint")
    assert state["epoch"] == result["best_epoch"]
    assert temporaries(run) == [] and not (run / ".lock").exists()


# --------------------------------------------------------------------------- signals at write points

def signal_at(monkeypatch, name: str, where: str, signum: int = signal.SIGINT) -> None:
    """``signum`` to this process at the first write of the file ``name``: ``during`` the save
    (inside torch.save), ``before`` or ``after`` the rename that puts it in place."""
    real_save, real_replace = torch.save, os.replace
    fired = []

    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if where == "during" and not fired:
            fired.append(1)
            os.kill(os.getpid(), signum)

    def replace(src, dst, *a, **k):
        hit = str(dst).endswith(name) and not fired
        if hit and where == "before":
            fired.append(1)
            os.kill(os.getpid(), signum)
        real_replace(src, dst, *a, **k)
        if hit and where == "after":
            fired.append(1)
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where, signum", [("during", signal.SIGINT), ("before", signal.SIGINT),
                                           ("after", signal.SIGINT), ("during", signal.SIGTERM)],
                         ids=["during", "before-rename", "after-rename", "during-SIGTERM"])
def test_a_signal_at_the_checkpoint_write_leaves_a_checkpoint_that_matches_the_json(
        train, data, tmp_path, monkeypatch, where, signum):
    run = tmp_path / "run"
    signal_at(monkeypatch, "best.pt", where, signum)
    result = train.main(flags(data, run, "--epochs", "5", "--patience", "5"))
    monkeypatch.undo()
    assert result["interrupted"] and result["best_epoch"] == 1 and result["epochs_run"] == 1
    assert_consistent(result, run)
    assert read_json(run / "results.json") == json.loads(json.dumps(result))


def test_a_signal_during_the_json_write_waits_for_the_file_to_be_whole(train, data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    signal_at(monkeypatch, "results.json", "before")
    with pytest.raises(KeyboardInterrupt):  # the stop comes once the file is in place
        train.main(flags(data, run))
    monkeypatch.undo()
    assert_consistent(read_json(run / "results.json"), run)


def test_a_signal_before_the_first_checkpoint_reports_none(train, data, tmp_path, monkeypatch):
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    result = train.main(flags(data, tmp_path / "run"))
    monkeypatch.undo()
    assert result["interrupted"] and result["best_epoch"] == -1 and result["checkpoint"] is None
    assert not (tmp_path / "run" / "best.pt").exists()


# --------------------------------------------------------------------------- reused and shared folders

def test_a_used_run_folder_is_refused_and_overwrite_never_reports_the_old_checkpoint(
        train, data, finished, tmp_path, monkeypatch, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = (run / "results.json").read_bytes()
    with pytest.raises(SystemExit, match="--run-dir .* holds an earlier run .*--overwrite"):
        train.main(flags(data, run, "--lr", "0.05"))
    assert (run / "results.json").read_bytes() == before and not (run / ".lock").exists()
    # --overwrite, interrupted before its first checkpoint: the earlier run's is deleted, not reported
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: os.kill(os.getpid(), signal.SIGINT))
    result = train.main(flags(data, run, "--lr", "0.05", "--overwrite"))
    monkeypatch.undo()
    assert result["checkpoint"] is None and result["best_epoch"] == -1
    assert not (run / "best.pt").exists() and read_json(run / "results.json")["config"]["lr"] == 0.05


def test_two_runs_on_one_folder_cannot_mix(data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(TRAIN), *flags(data, run, "--epochs", "100000", "--patience",
                                                                 "100000")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in first.stdout:  # the first run holds the folder and has written a checkpoint
            if line.startswith("epoch 1:"):
                break
        second = subprocess.run([sys.executable, str(TRAIN), *flags(data, run, "--overwrite", "--seed", "1")],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert second.returncode != 0
        assert f"in use by another run (pid {first.pid}" in second.stderr and "--run-dir" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 0
    result = read_json(run / "results.json")
    assert result["config"]["seed"] == 0
    assert_consistent(result, run, cwd=tmp_path)


def test_the_lock_of_a_run_that_died_is_taken_over(train, data, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{dead.pid} x\n")
    with pytest.warns(UserWarning, match=f"taking over the lock .*pid {dead.pid}"):
        result = train.main(flags(data, run, "--overwrite", "--epochs", "1"))
    assert_consistent(result, run)


def test_the_default_run_folder_is_new_for_every_run(train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train.parse_args(["--loss", "bpr"])
    first, second = train.default_run_dir(args), train.default_run_dir(args)
    assert first != second and first.parent == second.parent == Path("runs")
    assert first.name.startswith("bpr-") and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("loss", ["hdccf", "bpr"])
def test_resume_after_an_interrupt_gives_the_uninterrupted_result_bit_for_bit(
        train, data, tmp_path, monkeypatch, loss):
    extra = ("--loss", loss, "--epochs", "3", "--patience", "3")
    whole = train.main(flags(data, tmp_path / "whole", *extra))
    real_step, steps = torch.optim.Adam.step, []

    def step(self, *a, **k):  # stop in the middle of epoch 2 (4 batches an epoch)
        steps.append(1)
        if len(steps) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    cut = train.main(flags(data, tmp_path / "cut", *extra))
    monkeypatch.undo()
    assert cut["interrupted"] and cut["epochs_run"] == 1
    resumed = train.main(flags(data, tmp_path / "cut", *extra, "--resume"))
    for key in ("best_epoch", "epochs_run", "valid", "test", "prior_scan", "prior_strength"):
        assert resumed[key] == whole[key], key
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])
    assert_consistent(resumed, tmp_path / "cut")
    assert not (tmp_path / "cut" / "last.pt").exists()  # the run has ended: nothing left to resume
    with pytest.raises(SystemExit, match="--resume: .*last.pt not found"):
        train.main(flags(data, tmp_path / "cut", *extra, "--resume"))
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    steps.clear()
    train.main(flags(data, tmp_path / "cut", *extra, "--overwrite"))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"--resume: .*last.pt was written with other flags \(--lr 0.001 -> 0.5\)"):
        train.main(flags(data, tmp_path / "cut", *extra, "--resume", "--lr", "0.5"))


# --------------------------------------------------------------------------- outputs checked up front

def test_an_unwritable_out_fails_before_training(train, data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"--out: cannot write .*a_file/x.json"):
        train.main(flags(data, tmp_path / "run", "--out", str(blocker / "x.json")))
    assert "epoch 1" not in capsys.readouterr().out and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="--out: cannot write .*it is a folder"):
        train.main(flags(data, tmp_path / "run", "--out", str(tmp_path)))


@pytest.mark.parametrize("target", ["under_a_file", "a_folder"])
def test_save_data_to_an_unwritable_path_fails_naming_it_and_leaves_nothing(train, data, tmp_path, target):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = blocker / "x.pt" if target == "under_a_file" else tmp_path / "a_folder"
    if target == "a_folder":
        path.mkdir()
    with pytest.raises(SystemExit, match=f"--save-data: cannot write {path}"):
        train.main(["--dataset", str(data), "--min-item-interactions", "1", "--save-data", str(path)])
    assert temporaries(tmp_path) == []


def file_size_limited(code: str, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """Python ``code`` run with files limited to ``limit`` bytes once ``LIMIT()`` is called (a full disk)."""
    prelude = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               f"def LIMIT(): resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_a_full_disk_during_the_results_write_leaves_no_torn_json(data, tmp_path):
    run = tmp_path / "run"
    code = ("import json, runpy\nreal = json.dumps\n"
            "def dumps(obj, *a, **k):\n"
            "    text = real(obj, *a, **k)\n"
            "    if isinstance(obj, dict) and 'history' in obj: LIMIT()\n"
            "    return text\n"
            f"json.dumps = dumps\nsys.argv = {[str(TRAIN), *flags(data, run)]!r}\n"
            f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')\n")
    proc = file_size_limited(code, 200, tmp_path)
    assert proc.returncode != 0 and f"cannot write {run / 'results.json'}" in proc.stderr
    assert not (run / "results.json").exists() and temporaries(run) == []


def test_a_full_disk_during_the_checkpoint_write_leaves_no_temporary(data, tmp_path):
    run = tmp_path / "run"
    code = (f"import runpy\nLIMIT()\nsys.argv = {[str(TRAIN), *flags(data, run)]!r}\n"
            f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')\n")
    proc = file_size_limited(code, 2000, tmp_path)
    assert proc.returncode != 0 and f"cannot write {run / 'best.pt'}" in proc.stderr
    assert not run.exists()  # the folder this run made, left empty, is removed


def test_a_full_disk_during_tune_prior_keeps_the_old_json(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = (run / "results.json").read_bytes()
    code = (f"import runpy\nLIMIT()\nsys.argv = {[str(TUNE), str(run / 'results.json')]!r}\n"
            f"runpy.run_path({str(TUNE)!r}, run_name='__main__')\n")
    proc = file_size_limited(code, len(before) // 2, tmp_path)
    assert proc.returncode != 0 and f"cannot write {run / 'results.json'}" in proc.stderr
    assert (run / "results.json").read_bytes() == before and temporaries(run) == []


# --------------------------------------------------------------------------- damaged files

def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "bit-flipped":  # one bit in the middle of the payload (a weight, or the pickle)
        k = len(raw) * 2 // 3
        path.write_bytes(raw[:k] + bytes([raw[k] ^ 0x10]) + raw[k + 1:])
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"this is not a checkpoint at all\n" * 10)


DAMAGE = ["bit-flipped", "truncated", "empty", "garbage"]
MESSAGE = {"bit-flipped": "is corrupt \\(checksum mismatch", "truncated": "is corrupt \\(checksum mismatch",
           "empty": "is empty \\(0 bytes\\)", "garbage": "not a (checkpoint|data set saved by Dataset.save)"}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_refused_by_tune_prior_naming_it(tune, finished, tmp_path, how):
    run = copy_run(finished, tmp_path / "run")
    before = (run / "results.json").read_bytes()
    damage(run / "best.pt", how)
    with pytest.raises(SystemExit, match=f"{run / 'best.pt'}:? {MESSAGE[how]}"):
        tune.main([str(run / "results.json")])
    assert (run / "results.json").read_bytes() == before


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_damaged_results_json_is_named(tune, finished, tmp_path, how):
    run = copy_run(finished, tmp_path / "run")
    damage(run / "results.json", how)
    with pytest.raises(SystemExit, match=f"{run / 'results.json'} is (empty|not valid JSON)"):
        tune.main([str(run / "results.json")])


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_saved_data_set_is_refused_naming_it(data, tmp_path, how):
    saved = load_dataset(data, min_item_interactions=1).save(tmp_path / "split.pt")
    assert load_dataset(saved, min_item_interactions=1).num_train > 0
    damage(saved, how)
    with pytest.raises(ValueError, match=f"{saved}:? {MESSAGE[how]}"):
        load_dataset(saved, min_item_interactions=1)


def test_atomic_write_removes_its_temporary_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    save_checked({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_checked(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_a_corrupt_gzip_and_zip_name_the_file(tmp_path):
    good = gzip.compress(b"".join(b"%d\t%d\t3\t%d\n" % (u, i, u * i) for u in range(1, 40) for i in range(1, 30)))
    bad = tmp_path / "ratings.tsv.gz"
    bad.write_bytes(good[:20] + bytes([good[20] ^ 0xFF]) + good[21:])  # a bad deflate block: zlib.error
    with pytest.raises(ValueError, match=f"{bad}: corrupt gzip data"):
        load_dataset(bad)
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-100k/u.data", "1\t2\t3\t4\n" * 2000)
    raw = bytearray((tmp_path / "ml-100k.zip").read_bytes())
    raw[60] ^= 0xFF  # inside the compressed member
    (tmp_path / "ml-100k.zip").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{tmp_path / 'ml-100k.zip'}: not a readable zip file"):
        load_dataset(tmp_path / "ml-100k.zip")


def test_a_lightgcn_train_txt_without_its_test_txt_names_the_missing_file(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2 3 4\n1 0 2 4\n2 3\n3 1 2\n")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'test.txt'} is missing"):
        load_dataset(tmp_path / "train.txt")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'test.txt'}: missing"):
        load_dataset(tmp_path)
    # a delimited ratings file that happens to be called train.txt is still read as one
    (tmp_path / "train.txt").write_text("".join(f"{u} {i} 3 {u + i}\n" for u in range(1, 5) for i in range(1, 6)))
    assert load_dataset(tmp_path / "train.txt", min_item_interactions=0).stats["format"] == "delimited"


# --------------------------------------------------------------------------- the flag table

@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--max-batches", "0"], "--max-batches"),
    (["--threads", "0"], "--threads"), (["--patience", "-1"], "--patience"), (["--patience", "0"], "--patience"),
    (["-M", "0"], "-M/--batch-size"), (["-P", "0"], "-P/--pool"), (["--dim", "0"], "--dim"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--lr", "0"], "--lr"), (["--lr", "inf"], "--lr"), (["--temperature", "nan"], "--temperature"),
    (["--temperature", "0"], "--temperature"), (["--omega-user", "1"], "--omega-user"),
    (["--lambda-item", "-0.5"], "--lambda-item"), (["--ks", "10", "0"], "--ks"),
    (["--min-item-interactions", "-1"], "--min-item-interactions"),
])
def test_each_flag_is_checked_against_its_range(train, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(argv)
    assert exit_.value.code == 2 and f"error: {flag}: expected" in capsys.readouterr().err


def test_pool_and_batch_are_checked_against_the_data_before_training(train, data, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"-P/--pool: 100 exceeds the catalogue .*\(60 users, 274 items\)"):
        train.main(flags(data, tmp_path / "a", "-P", "100"))
    with pytest.raises(SystemExit, match=r"-M/--batch-size: 5000 exceeds the \d+ training pairs"):
        train.main(flags(data, tmp_path / "b", "-M", "5000"))
    assert "epoch 1" not in capsys.readouterr().out
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # the run folders it made are gone


def test_the_working_set_is_checked_against_memory(train):
    args = train.parse_args(["-M", "20000", "-P", "900"])  # ML-100K-sized, about 28 GiB
    assert train.working_set_bytes(args) > 20 * 2**30
    cpu = torch.device("cpu")
    message = train.memory_problem(args, cpu, available=16 * 2**30)
    assert message.startswith("-M/--batch-size 20000 and -P/--pool 900") and "16.0 GiB free" in message
    assert train.memory_problem(train.parse_args([]), cpu, available=16 * 2**30) is None
    assert train.memory_problem(train.parse_args(["-M", "20000", "-P", "900", "--loss", "bpr"]), cpu, 2**30) is None
