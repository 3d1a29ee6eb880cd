"""README's headline results table is the output of `examples/summarize_results.py --markdown`."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- results-table:start -->\n", "<!-- results-table:end -->"


def summarize_module():
    spec = importlib.util.spec_from_file_location("summarize_results", REPO / "examples" / "summarize_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_table(text: str) -> str:
    assert text.count(START) == 1 and text.count(END) == 1, "README.md needs one pair of results-table markers"
    return text[text.index(START) + len(START):text.index(END)]


def generated_table() -> str:
    module = summarize_module()
    return module.headline(module.default_results()) + "\n"


def test_readme_table_is_the_scripts_output():
    table = readme_table((REPO / "README.md").read_text())
    assert table == generated_table(), ("README.md's results table differs from the script's; paste the output of "
                                        "`python examples/summarize_results.py --markdown` between its markers")


def test_the_command_line_prints_the_same_table():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "summarize_results.py"), "--markdown"],
                         capture_output=True, text=True, timeout=120, check=True, cwd=REPO).stdout
    assert out == generated_table()


def test_a_changed_digit_is_caught():
    text = (REPO / "README.md").read_text()
    table = readme_table(text)
    changed = re.sub(r"0\.(\d{4})", lambda m: f"0.{(int(m.group(1)) + 1) % 10000:04d}", table, count=1)
    assert changed != table and changed != generated_table()


def test_each_headline_row_is_one_setting_with_three_seeds():
    module = summarize_module()
    results = [json.loads(p.read_text()) for p in module.default_results()]
    for name, settings in module.HEADLINE:
        wanted = {**module.HEADLINE_BATCH, **settings}
        runs = [r for r in results if all(module.setting(r["config"], k) == v for k, v in wanted.items())]
        assert sorted(r["config"]["seed"] for r in runs) == [0, 1, 2], name
        assert all(r["config"]["split"] == "auto" and r["dataset"]["name"] == "ml-1m" for r in runs), name


def test_a_headline_row_matching_two_settings_is_refused(tmp_path):
    module = summarize_module()
    metrics = {p: {m: 0.5 for m in module.METRICS} for p in ("sampled", "full")}
    runs = [(n, {"epochs": 15}) for n in range(len(module.HEADLINE))] + [(2, {"epochs": 30})]  # BPR twice
    paths = []
    for i, (row, extra) in enumerate(runs):
        config = {**module.HEADLINE_BATCH, **module.HEADLINE[row][1], "seed": 0, **extra}
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"config": config, "test": metrics}))
    assert module.headline(paths[:-1]).count("| 1 |") == len(module.HEADLINE)
    with pytest.raises(ValueError, match="BPR.*2 settings"):
        module.headline(paths)


def test_per_user_runs_get_recall_and_ndcg_at_20_and_cannot_share_a_table(tmp_path):
    module = summarize_module()
    paths = []
    for seed, (recall, wall) in enumerate([(0.10, 600), (0.20, 1200)]):
        metrics = {"per_user": {"Recall@20": recall, "NDCG@20": recall / 2}}
        config = {**module.HEADLINE_BATCH, **module.HEADLINE[2][1], "seed": seed, "select_protocol": "per_user",
                  "select_metric": "Recall@20"}
        paths.append(tmp_path / f"gowalla{seed}.json")
        paths[-1].write_text(json.dumps({"config": config, "test": metrics, "valid": metrics, "wall_seconds": wall,
                                         "best_epoch": 1, "epochs_run": 1}))
    table = module.summarize(paths).splitlines()
    assert table[0] == "| method | seeds | Recall@20 | NDCG@20 | wall (min) |"
    assert table[2].endswith("| 2 | 0.1500 ± 0.0707 | 0.0750 ± 0.0354 | 15 |")
    assert "valid per_user Recall@20" in module.per_run(paths).splitlines()[0]
    loo = tmp_path / "ml1m.json"
    loo.write_text(json.dumps({"config": {**module.HEADLINE_BATCH, **module.HEADLINE[2][1], "seed": 0},
                               "test": {p: {m: 0.5 for m in module.METRICS} for p in ("sampled", "full")}}))
    with pytest.raises(ValueError, match="cannot share a table"):
        module.summarize(paths + [loo])


def test_readme_gowalla_table_is_the_scripts_output():
    module = summarize_module()
    text = (REPO / "README.md").read_text()
    start, end = "<!-- gowalla-table:start -->\n", "<!-- gowalla-table:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    runs = sorted((REPO / "examples" / "results").glob("gowalla*/*.json"))
    assert len(runs) >= 3 and all(json.loads(p.read_text())["dataset"]["name"] == "gowalla" for p in runs)
    table = module.metric_rows(module.tuned_rows(runs), "test")
    assert text[text.index(start) + len(start):text.index(end)] == table + "\n", \
        "paste `python examples/summarize_results.py --tuned examples/results/gowalla*/*.json` between the markers"


def test_tuned_rows_choose_each_familys_setting_by_its_seed_0_validation(tmp_path):
    module = summarize_module()
    paths = []

    def run(name, seed, valid, test, **config):
        metrics = lambda v: {"per_user": {"Recall@20": v, "NDCG@20": v / 2}}  # noqa: E731
        config = {**module.HEADLINE_BATCH, "loss": "softmax", "similarity": "dot", "lr": 0.001, "weight_decay": 0.0,
                  "seed": seed, "select_protocol": "per_user", "select_metric": "Recall@20", **config}
        paths.append(tmp_path / f"{name}_s{seed}.json")
        paths[-1].write_text(json.dumps({"config": config, "valid": metrics(valid), "test": metrics(test),
                                         "wall_seconds": 60}))

    run("a", 0, 0.20, 0.10, temperature=1.0)  # the choice: best seed-0 validation ...
    run("a", 1, 0.10, 0.30, temperature=1.0)  # ... whatever its other seeds score
    run("b", 0, 0.19, 0.50, temperature=0.5)  # a better test score does not choose
    run("c", 0, 0.30, 0.10, temperature=0.5, logq=True)  # another family
    rows = module.tuned_rows(paths)
    assert [(name, [r["config"]["seed"] for r in runs]) for name, runs in rows] == [
        ("in-batch softmax (2 settings): τ = 1", [0, 1]), ("in-batch softmax + logQ (1 setting): τ = 0.5", [0])]
    margins = module.margins(paths, tuned=True)
    assert margins.count("\n") == 1  # no HDCCF family among the runs: the header alone


def test_margins_compare_each_hdccf_row_with_the_best_baseline_per_metric():
    module = summarize_module()
    rows = dict(module.headline_rows(module.default_results()))
    table = module.margins(module.default_results()).splitlines()
    hdccf = [line for line in table[2:]]
    assert [line.split(" | ")[0].lstrip("| ") for line in hdccf] == [n for n in rows if n.startswith("HDCCF")]
    # the first cell: sampled HR@10 of the paper's HDCCF row against the best baseline's mean
    mean = lambda runs: sum(r["test"]["sampled"]["HR@10"] for r in runs) / len(runs)  # noqa: E731
    name = next(iter(rows))
    best = max(mean(runs) for n, runs in rows.items() if not n.startswith("HDCCF"))
    assert f"{100 * (mean(rows[name]) / best - 1):+.1f} %" in hdccf[0].split(" | ")[1]
