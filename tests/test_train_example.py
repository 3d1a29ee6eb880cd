"""examples/train_ml1m.py runs end to end for one short epoch and writes a well-formed JSON."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def synthetic_ratings(path: Path, num_users=60, num_items=300, per_user=12, seed=0):
    import random

    rng = random.Random(seed)
    lines = []
    for u in range(1, num_users + 1):
        for t, i in enumerate(rng.sample(range(1, num_items + 1), per_user)):
            lines.append(f"{u}\t{i}\t{rng.randint(1, 5)}\t{1000 + 10 * t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_script(tmp_path, *flags):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "examples" / "train_ml1m.py"), *flags, "--epochs", "1",
           "--max-batches", "3", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return last, json.loads(out.read_text())


def check_result(last, full, cwd):
    # alpha of the prior alpha*log q(i) is chosen on validation from the grid, for every loss
    assert full["config"]["item_prior"] == "tune"
    grid = full["config"]["prior_grid"]
    assert full["prior_strength"] in grid and set(full["prior_scan"]) == {str(a) for a in grid}
    best = max(full["prior_scan"].values())
    assert full["selection"] == "validation sampled NDCG@10" and full["protocol"].startswith("leave-one-out")
    assert full["prior_scan"][str(full["prior_strength"])] == best == full["valid"]["sampled"]["NDCG@10"]
    raw = full["prior_strength"] != 0  # the raw scores are reported beside when a prior was added
    splits = ("valid", "test", "valid_without_prior", "test_without_prior") if raw else ("valid", "test")
    assert ("test_without_prior" in full) == raw
    for split in splits:
        for protocol in ("sampled", "full"):
            metrics = full[split][protocol]
            assert set(metrics) == {f"{m}@{k}" for m in ("HR", "NDCG") for k in (10, 20, 50)}
            assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert full["epochs_run"] == 1 and full["best_epoch"] == 1
    # paths under the folder the script ran in are written relative to it
    assert (full["checkpoint"], full["config"]["run_dir"], full["config"]["out"]) == \
        ("run/best.pt", "run", "results.json")
    assert (cwd / full["checkpoint"]).exists()
    assert last["test"] == full["test"] and "history" not in last
    assert full["history"][0]["train_loss"] > 0


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="ML-100K copy not in ../shared/data")
def test_hdccf_on_ml100k(tmp_path):
    last, full = run_script(tmp_path, "--dataset", "ml-100k", "--data-dir", str(REPO.parent / "shared" / "data"),
                            "-M", "128")
    check_result(last, full, tmp_path)
    assert full["dataset"]["num_users"] == 943


@pytest.mark.parametrize("flags", [
    ("--loss", "bpr"),
    ("--loss", "softmax", "--similarity", "cosine"),
    ("--similarity", "modulated", "--dim", "8", "--no-debias"),
    ("--logq", "--mixed-negatives", "8"),
    ("--loss", "softmax", "--logq"),
], ids=["bpr", "softmax-cosine", "modulated", "hdccf-logq-mixed", "softmax-logq"])
def test_baselines_on_synthetic_data(tmp_path, flags):
    data = synthetic_ratings(tmp_path / "ratings.tsv")
    last, full = run_script(tmp_path, "--dataset", str(data), "--min-item-interactions", "1", "-M", "32",
                            "-P", "2", *flags)
    check_result(last, full, tmp_path)
    assert full["config"]["loss"] == (flags[1] if flags[0] == "--loss" else "hdccf")
    assert full["config"]["logq"] == ("--logq" in flags)
    assert full["config"]["mixed_negatives"] == (8 if "--mixed-negatives" in flags else 0)


def test_logq_and_mixed_negatives_are_refused_for_bpr(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_ml1m.py"), "--loss", "bpr", "--logq"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--logq and --mixed-negatives apply to the in-batch losses" in proc.stderr


def test_training_on_a_saved_split_matches_training_on_its_source(tmp_path):
    data = synthetic_ratings(tmp_path / "ratings.tsv")
    saved = tmp_path / "split.pt"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_ml1m.py"), "--dataset", str(data),
                           "--min-item-interactions", "1", "--save-data", str(saved)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=True)
    assert saved.exists() and "--dataset" in proc.stdout
    flags = ("--min-item-interactions", "1", "-M", "32", "--seed", "3")
    for folder in ("direct", "file"):
        (tmp_path / folder).mkdir()
    _, direct = run_script(tmp_path / "direct", "--dataset", str(data), *flags)
    _, from_file = run_script(tmp_path / "file", "--dataset", str(saved), *flags)
    assert from_file["dataset"]["stats"]["saved_file"] == str(saved)
    for key in ("valid", "test", "prior_scan"):
        assert from_file[key] == direct[key]
    assert from_file["history"][0]["train_loss"] == direct["history"][0]["train_loss"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_cleanly_with_results(tmp_path, signum):
    # started as a background job is: SIGINT ignored, so Python would not raise KeyboardInterrupt itself
    data = synthetic_ratings(tmp_path / "ratings.tsv")
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "examples" / "train_ml1m.py"), "--dataset", str(data),
           "--min-item-interactions", "1", "-M", "8", "--epochs", "100000", "--patience", "100000",
           "--run-dir", str(tmp_path / "run"), "--out", str(out), "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in proc.stdout:  # wait for a checkpoint
        if line.startswith("epoch 1:"):
            break
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["interrupted"] and result["best_epoch"] >= 1 and "interrupted" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["test"] == result["test"]


def test_gpu_script_dry_run_on_cpu(tmp_path):
    data = synthetic_ratings(tmp_path / "ratings.tsv")
    saved = tmp_path / "split.pt"
    subprocess.run([sys.executable, str(REPO / "examples" / "train_ml1m.py"), "--dataset", str(data),
                    "--min-item-interactions", "1", "--save-data", str(saved)],
                   capture_output=True, text=True, timeout=300, check=True)
    env = {**os.environ, "DATA": str(saved), "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "SEEDS": "0 1",
           "EXTRA": "--min-item-interactions 1 --epochs 1 --max-batches 2 -M 16 --dim 8"}
    proc = subprocess.run(["bash", str(REPO / "examples" / "gpu_ml1m.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert names == ["hdccf_dot_gpu_s0.json", "hdccf_modulated_s0.json", "hdccf_modulated_s1.json"]
    modulated = json.loads((tmp_path / "out" / "hdccf_modulated_s1.json").read_text())
    assert modulated["config"]["similarity"] == "modulated" and modulated["config"]["seed"] == 1
    assert not list((tmp_path / "out").glob("*/best.pt"))  # checkpoints are not sent back
    sent = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert sent == ["gpu.txt", "hdccf_dot_gpu_s0.json", "hdccf_modulated_s0.json", "hdccf_modulated_s1.json",
                    "logs.tar.gz"]  # a device call returns at most 8 files
    missing = subprocess.run(["bash", str(REPO / "examples" / "gpu_ml1m.sh")], capture_output=True, text=True,
                             env={**env, "DATA": str(tmp_path / "nope.pt")}, timeout=60)
    assert missing.returncode == 2 and "--save-data" in missing.stderr


def test_missing_data_says_how_to_point_at_a_copy(tmp_path):
    cmd = [sys.executable, str(REPO / "examples" / "train_ml1m.py"), "--dataset", str(tmp_path / "nope.dat")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "--data-dir" in proc.stderr


def test_help_explains_the_flags():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "train_ml1m.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for flag in ("--loss", "--no-debias", "--similarity", "--omega-user", "--preset", "--distributed"):
        assert flag in out
    assert "tau (preset: cpu 0.7, paper 0.1)" in " ".join(out.split())  # no "default: None" for preset flags


def test_presets_fill_the_flags_not_given():
    train = load_example("train_ml1m")
    cpu = train.parse_args([])
    assert (cpu.omega_user, cpu.omega_item, cpu.temperature, cpu.batch_size) == (0.0, 0.0, 0.7, 512)
    paper = train.parse_args(["--preset", "paper", "--temperature", "0.3"])
    assert (paper.omega_user, paper.temperature, paper.batch_size) == (0.05, 0.3, 2048)


def test_distributed_training_with_two_gloo_processes(tmp_path):
    data = synthetic_ratings(tmp_path / "ratings.tsv")
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "examples" / "train_ml1m.py"), "--distributed", "--dataset", str(data),
           "--min-item-interactions", "1", "-M", "16", "-P", "2", "--epochs", "1", "--max-batches", "3",
           "--run-dir", str(tmp_path / "run"), "--out", str(out), "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads(out.read_text())
    assert full["world_size"] == 2 and full["config"]["distributed"]
    check_result(json.loads(proc.stdout.strip().splitlines()[-1]), full, tmp_path)


def load_example(name: str):
    """An examples/ script as a module; examples/ is on sys.path while it loads (for its own imports)."""
    import importlib.util

    sys.path.insert(0, str(REPO / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


def test_modulated_training_on_a_cpu_warns_about_its_cost_at_large_batches():
    train = load_example("train_ml1m")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    note = train.modulated_cost_note(train.parse_args(["--similarity", "modulated"]), cpu)
    assert note and "M*P = 1024" in note and "-M 128 -P 1" in note
    quiet = [(["--similarity", "modulated"], cuda), (["--similarity", "modulated", "-M", "128", "-P", "1"], cpu),
             ([], cpu)]
    for argv, device in quiet:
        assert train.modulated_cost_note(train.parse_args(argv), device) is None, (argv, device)


def load_summarize():
    return load_example("summarize_results")


def test_summarize_results_groups_seeds(tmp_path):
    summarize = load_summarize()
    metrics = lambda v: {p: {m: v for m in ("HR@10", "NDCG@10", "NDCG@50")} for p in ("sampled", "full")}  # noqa: E731
    paths = []
    for seed, value in ((0, 0.5), (1, 0.7), (0, 0.1)):
        loss = "bpr" if value == 0.1 else "hdccf"
        result = {"config": {"loss": loss, "seed": seed, "out": f"r{seed}{loss}.json"}, "test": metrics(value)}
        paths.append(tmp_path / f"{loss}{seed}.json")
        paths[-1].write_text(json.dumps(result))
    table = summarize.summarize(paths).splitlines()
    assert len(table) == 4  # header, rule, two methods
    assert table[2].startswith("| hdccf, dot, auto split | 2 | 0.6000 ± 0.1414 |")
    assert table[3].startswith("| bpr, auto split | 1 | 0.1000 ± 0.0000 |")


def test_tune_prior_rescores_a_finished_run_the_same_way(tmp_path):
    """examples/tune_prior.py reproduces the run's own final evaluation, and honours a new grid."""
    data = synthetic_ratings(tmp_path / "ratings.tsv")
    _, full = run_script(tmp_path, "--dataset", str(data), "--min-item-interactions", "1", "-M", "32",
                         "-P", "2", "--prior-grid", "0", "0.5", "3")
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(full))
    tool = [sys.executable, str(REPO / "examples" / "tune_prior.py"), str(copy)]
    subprocess.run(tool, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=True)
    again = json.loads(copy.read_text())
    for key in ("valid", "test", "prior_strength", "prior_scan", "history", "config"):
        assert again[key] == full[key], key
    subprocess.run(tool + ["--prior-grid", "0"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                   check=True)
    zero = json.loads(copy.read_text())
    assert zero["prior_strength"] == 0 and "test_without_prior" not in zero
    assert zero["config"]["prior_grid"] == [0.0]


def test_summarize_names_omega_and_temperature():
    summarize = load_summarize()
    assert summarize.describe({"loss": "hdccf", "omega_user": 0.0, "omega_item": 0.0}) == "hdccf, ω=0/0, dot, auto split"
    assert summarize.describe({"loss": "hdccf", "omega_user": 0.05, "omega_item": 0.05, "temperature": 0.5}) == \
        "hdccf, ω=0.05/0.05, τ=0.5, dot, auto split"
    assert "ω" not in summarize.describe({"loss": "hdccf", "no_debias": True, "omega_user": 0.0, "omega_item": 0.0})
    assert summarize.describe({"loss": "softmax", "temperature": 1.0, "omega_user": 0.05}) == "softmax, τ=1, dot, auto split"
    assert summarize.describe({"loss": "bpr", "temperature": 0.5}) == "bpr, auto split"


def test_summarize_names_a_non_default_lambda():
    summarize = load_summarize()
    assert summarize.describe({"loss": "hdccf", "lambda_user": 0.5, "lambda_item": 0.5}) == "hdccf, λ=0.5/0.5, dot, auto split"
    assert summarize.describe({"loss": "hdccf", "lambda_user": 0.0, "lambda_item": 0.0}) == "hdccf, no aux, dot, auto split"
    assert summarize.describe({"loss": "hdccf", "lambda_user": 1.0, "lambda_item": 1.0}) == "hdccf, dot, auto split"


@pytest.mark.parametrize("loss, settings", [("bpr", ("temperature", 0.2, 0.5)),
                                             ("softmax", ("omega_user", 0.05, 0.0)),
                                             ("softmax", ("lambda_item", 1.0, 0.0)),
                                             ("hdccf", ("max_batches", None, "absent")),  # a flag added later
                                             ("hdccf", ("save_data", None, "runs/x.pt"))])
def test_summarize_groups_runs_that_differ_only_in_settings_their_loss_ignores(tmp_path, loss, settings):
    summarize = load_summarize()
    metrics = {p: {m: 0.5 for m in ("HR@10", "NDCG@10", "NDCG@50")} for p in ("sampled", "full")}
    key, *values = settings
    paths = []
    for seed, value in enumerate(values):
        paths.append(tmp_path / f"{loss}{seed}.json")
        config = {"loss": loss, "seed": seed, **({} if value == "absent" else {key: value})}
        paths[-1].write_text(json.dumps({"config": config, "test": metrics}))
    header, rule, *rows = summarize.summarize(paths).splitlines()
    assert len(rows) == 1 and rows[0].startswith(f"| {loss}, ") and "| 2 |" in rows[0]


def test_summarize_names_the_setting_that_tells_two_same_named_groups_apart(tmp_path):
    summarize = load_summarize()
    metrics = {p: {m: 0.5 for m in ("HR@10", "NDCG@10", "NDCG@50")} for p in ("sampled", "full")}
    paths = []
    for seed, epochs in ((0, 15), (1, 30)):
        paths.append(tmp_path / f"run{seed}.json")
        paths[-1].write_text(json.dumps({"config": {"loss": "bpr", "seed": seed, "epochs": epochs}, "test": metrics}))
    rows = summarize.summarize(paths).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| bpr, auto split, epochs 15", "| bpr, auto split, epochs 30"]


def test_summarize_per_run_lists_each_run_best_validation_first(tmp_path):
    summarize = load_summarize()
    paths = []
    for name, config, ndcg in (("bpr", {"loss": "bpr", "lr": 0.001, "weight_decay": 0.001, "temperature": 0.2}, 0.40),
                               ("hd", {"loss": "hdccf", "lr": 0.001, "temperature": 0.5, "lambda_user": 2.0,
                                       "lambda_item": 2.0, "omega_user": 0.0, "omega_item": 0.0}, 0.42)):
        result = {"config": {"seed": 0, **config}, "best_epoch": 3, "epochs_run": 5, "prior_strength": 0.3,
                  "wall_seconds": 120.0, "valid": {"sampled": {"NDCG@10": ndcg, "HR@10": 0.6}}}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))
    rows = summarize.per_run(paths).splitlines()
    assert len(rows) == 4
    assert rows[2].startswith("| hdccf, ω=0/0, λ=2/2, τ=0.5, dot, auto split | lr 0.001, τ 0.5, wd 0, λ 2/2, ω 0/0 | 0 | 3/5 "
                              "| 0.3 | 0.4200 |")
    assert rows[3].startswith("| bpr, auto split | lr 0.001, wd 0.001 | 0 | 3/5 | 0.3 | 0.4000 |")  # no τ for BPR


def test_plot_labels_name_the_settings_that_tell_runs_apart():
    plot = load_summarize()
    base = {"loss": "hdccf", "similarity": "dot", "omega_user": 0.0, "omega_item": 0.0}
    assert plot.run_label({**base, "lambda_user": 0.5, "lambda_item": 0.5}) == "HDCCF ω=0/0 λ=0.5/0.5 (dot)"
    assert plot.run_label({**base, "lambda_user": 1.0, "lambda_item": 1.0}) == "HDCCF ω=0/0 (dot)"
    assert plot.run_label({**base, "lambda_user": 0.0, "lambda_item": 0.0}) == "HDCCF ω=0/0 w/o aux (dot)"
    assert plot.run_label({**base, "temperature": 0.7}) == "HDCCF ω=0/0 τ=0.7 (dot)"
    assert plot.run_label({"loss": "softmax", "temperature": 1.0}) == "in-batch softmax τ=1"
    assert plot.run_label({"loss": "bpr", "temperature": 0.5}) == "BPR"

def test_plot_draws_runs_that_differ_beyond_their_seed_as_separate_curves():
    plot = load_summarize()
    history = lambda v: [{"valid": {"sampled": {"NDCG@10": v}}}, {"train_loss": 1.0}]  # noqa: E731
    base = {"loss": "hdccf", "similarity": "dot", "omega_user": 0.0, "omega_item": 0.0, "temperature": 0.7}
    results = [{"config": {**base, "batch_size": 512, "seed": 0}, "history": history(0.41)},
               {"config": {**base, "batch_size": 512, "seed": 1}, "history": history(0.42)},
               {"config": {**base, "batch_size": 128, "seed": 0}, "history": history(0.40)},
               {"config": {**base, "batch_size": 128, "similarity": "modulated", "seed": 0}, "history": history(0.43)}]
    assert plot.validation_curves(results) == {
        "HDCCF ω=0/0 τ=0.7 (dot), batch_size 512": [[0.41], [0.42]],
        "HDCCF ω=0/0 τ=0.7 (dot), batch_size 128": [[0.40]],
        "HDCCF ω=0/0 τ=0.7": [[0.43]],
    }


def test_plot_of_per_user_runs_draws_their_selection_metric(tmp_path):
    summarize = load_summarize()
    result = {"config": {"loss": "bpr", "seed": 0, "select_protocol": "per_user", "select_metric": "Recall@20"},
              "history": [{"valid": {"per_user": {"Recall@20": r}}} for r in (0.1, 0.12)],
              "valid": {"per_user": {"Recall@20": 0.12}}}
    assert summarize.validation_curves([result], "per_user", "Recall@20") == {"BPR": [[0.1, 0.12]]}
    path = tmp_path / "bpr.json"
    path.write_text(json.dumps(result))
    summarize.main([str(path), "--plot", str(tmp_path / "curves.png")])  # the selection metric by default
    assert (tmp_path / "curves.png").stat().st_size > 0


def _scored_checkpoint(full, cwd, data, **load):
    """The test metrics of the run's best.pt, reloaded into a fresh model (nothing re-tuned)."""
    from hdccf_triton import EmbeddingModel, Evaluator, load_dataset
    from hdccf_triton.atomic import load_checked

    ds = load_dataset(data, seed=0, **load)
    model = EmbeddingModel(ds.num_users, ds.num_items, full["config"]["dim"])
    state = load_checked(cwd / full["checkpoint"], what="checkpoint")
    model.load_state_dict(state["model"])
    assert state["prior_strength"] == full["prior_strength"]
    return Evaluator.from_dataset(ds, seed=0).evaluate(model.eval(), "test", ks=full["config"]["ks"])


def test_the_checkpoint_is_the_model_the_test_split_scored(tmp_path):
    """best.pt holds the tuned prior α·log q, not α = τ: reloaded, it reproduces the JSON's test metrics."""
    data = synthetic_ratings(tmp_path / "ratings.tsv")
    _, full = run_script(tmp_path, "--dataset", str(data), "--min-item-interactions", "1", "-M", "32",
                         "-P", "2", "--prior-grid", "0", "0.5", "3", "--temperature", "0.5")
    assert full["prior_strength"] != full["config"]["temperature"]  # else the old bug would pass
    assert _scored_checkpoint(full, tmp_path, data, min_item_interactions=1) == full["test"]


def lightgcn_folder(path: Path, num_users=40, num_items=60, per_user=9, test_per_user=3, seed=0) -> Path:
    """A small LightGCN-format split (train.txt / test.txt, several test items per user, one rare item)."""
    import random

    rng = random.Random(seed)
    train, test = [], []
    for u in range(num_users):
        items = rng.sample(range(num_items - 1), per_user + test_per_user)
        train.append(" ".join(map(str, [u, *items[:per_user]])))
        test.append(" ".join(map(str, [u, *items[per_user:]])))
    train[0] += f" {num_items - 1}"  # an item with one interaction: a filter would drop it
    path.mkdir()
    (path / "train.txt").write_text("\n".join(train) + "\n")
    (path / "test.txt").write_text("\n".join(test) + "\n")
    return path


@pytest.mark.parametrize("loss", ["hdccf", "bpr"])
def test_a_given_test_set_is_scored_per_user_and_selected_on_recall(tmp_path, loss):
    data = lightgcn_folder(tmp_path / "g")
    last, full = run_script(tmp_path, "--dataset", str(data), "--loss", loss, "-M", "16", "-P", "2",
                            "--prior-grid", "0", "0.5", "1")
    assert full["protocol"].startswith("given test set") and full["selection"] == "validation per_user Recall@20"
    assert full["dataset"]["num_items"] == 60 and full["dataset"]["stats"]["filters"].startswith("not applied")
    names = {f"{m}@{k}" for m in ("Recall", "NDCG", "Precision", "HitRate") for k in (10, 20, 50)}
    for split in ("valid", "test"):
        assert list(full[split]) == ["per_user"] and set(full[split]["per_user"]) == names
    assert full["prior_scan"][str(full["prior_strength"])] == full["valid"]["per_user"]["Recall@20"]
    assert full["history"][0]["valid"]["per_user"]["Recall@20"] >= 0
    assert last["test"] == full["test"]
    assert _scored_checkpoint(full, tmp_path, data) == full["test"]


def test_a_leave_one_out_protocol_on_a_given_test_set_is_refused(tmp_path):
    data = lightgcn_folder(tmp_path / "g")
    cmd = [sys.executable, str(REPO / "examples" / "train_ml1m.py"), "--dataset", str(data),
           "--select-protocol", "sampled", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "--select-protocol: sampled" in proc.stderr and "per_user" in proc.stderr
    cmd[cmd.index("sampled")] = "per_user"
    proc = subprocess.run(cmd + ["--select-metric", "Recall@30"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "--select-metric: 'Recall@30'" in proc.stderr
