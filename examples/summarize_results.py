"""Summarise results JSONs of train_ml1m.py: Markdown tables (mean ± std over seeds) and plots.

    python examples/summarize_results.py runs/*/results.json
    python examples/summarize_results.py examples/results/ml1m/*.json --split test
    python examples/summarize_results.py examples/results/ml1m_tuning/*.json --per-run
    python examples/summarize_results.py --markdown            # README's headline table
    python examples/summarize_results.py --tuned examples/results/gowalla*/*.json   # README's Gowalla table
    python examples/summarize_results.py runs/*/results.json --plot valid_ndcg.png

Without file arguments the committed ML-1M runs, examples/results/ml1m/*.json and
examples/results/ml1m_logq/*.json, are read.

Runs are grouped by everything in their config except the seed and the output paths; each
group gives one row with the number of seeds and the mean ± the sample standard deviation over
its seeds of the metrics of the runs' protocol: HR@10, NDCG@10 and NDCG@50 under the sampled and
the full protocol for leave-one-out data (ML-1M); Recall@20 and NDCG@20 (per user), with the
wall time, for a given test set (Gowalla). Rows of both kinds in one table are refused.
With `--per-run`, each run gives one row instead: its hyperparameters, epochs, the tuned prior
strength and its validation selection metric (sampled NDCG@10, or Recall@20 on a given test
set), best first: a tuning log.
With `--markdown`, the rows are the methods of HEADLINE at their chosen settings (the table
README.md shows between its results-table markers, or its gowalla-table markers for the Gowalla
runs; tests/test_results_table.py checks that they agree). With `--plot PNG`, the validation
selection metric per epoch of each group is drawn (the
mean over seeds, their range shaded); each curve is labelled by its loss and ablation flags,
plus the settings that tell it apart from a same-named curve (e.g. "batch_size 128").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from hdccf_triton.atomic import read_json  # errors name the file

#: the folders of the ML-1M runs the headline table reads: the paper's methods, and logQ / mixed negatives
RESULT_DIRS = tuple(Path(__file__).resolve().parent / "results" / name for name in ("ml1m", "ml1m_logq"))


def default_results() -> list[Path]:
    """The JSONs of :data:`RESULT_DIRS`, in a fixed order."""
    return sorted(p for folder in RESULT_DIRS for p in folder.glob("*.json"))
METRICS = ("HR@10", "NDCG@10", "NDCG@50")
#: the columns of each kind of evaluation: leave-one-out (both protocols) or a given test set (per user)
COLUMNS = {"leave-one-out": [(p, m) for p in ("sampled", "full") for m in METRICS],
           "per user": [("per_user", "Recall@20"), ("per_user", "NDCG@20")]}
#: config keys that do not define a method
IGNORED = {"seed", "run_dir", "out", "no_progress", "threads", "data_dir", "device", "distributed", "save_data",
           "overwrite", "resume"}
#: settings added after runs were recorded, with the value a JSON without them had
LATER_DEFAULTS = {"logq": False, "mixed_negatives": 0}


def setting(config: dict, key: str):
    """A run's setting, or for a JSON from before the flag existed the value it had then."""
    return config.get(key, LATER_DEFAULTS.get(key))


def sampling_variant(config: dict) -> list[str]:
    """The in-batch losses' sampling options of a run: e.g. ["logQ", "mixed 256"]."""
    parts = ["logQ"] if setting(config, "logq") else []
    if setting(config, "mixed_negatives"):
        parts.append(f"mixed {setting(config, 'mixed_negatives')}")
    return parts


def unused_settings(config: dict) -> set[str]:
    """Config keys that the run's loss ignores (BPR has no τ; without debiasing ω has no effect)."""
    loss = config.get("loss", "hdccf")
    unused = set()
    if loss == "bpr":
        unused |= {"temperature", "no_debias", "lambda_user", "lambda_item", "omega_user", "omega_item"}
    if loss == "softmax":
        unused |= {"no_debias", "lambda_user", "lambda_item", "omega_user", "omega_item"}
    if config.get("no_debias"):
        unused |= {"omega_user", "omega_item"}
    return unused


def omegas(config: dict) -> str | None:
    """"ω_u/ω_i" of a debiased HDCCF run, else None (the defaults differ between presets, so always named)."""
    if config.get("loss", "hdccf") != "hdccf" or config.get("no_debias") or "omega_user" not in config:
        return None
    return f"{config['omega_user']:g}/{config.get('omega_item', config['omega_user']):g}"


def non_default_lambda(config: dict) -> str | None:
    """"λ_u/λ_i" of an HDCCF run whose auxiliary weights are neither the default 1 nor 0 (no aux), else None."""
    lambdas = (config.get("lambda_user", 1.0), config.get("lambda_item", 1.0))
    if config.get("loss", "hdccf") != "hdccf" or lambdas in ((1.0, 1.0), (0.0, 0.0)):
        return None
    return f"{lambdas[0]:g}/{lambdas[1]:g}"


def hdccf_variant(config: dict, without: str = "no") -> list[str]:
    """How an HDCCF run departs from the default loss: e.g. ["ω=0/0", "no aux"] (``without="w/o"``: "w/o aux")."""
    parts = []
    if config.get("no_debias"):
        parts.append(f"{without} debias")
    elif omegas(config):
        parts.append(f"ω={omegas(config)}")
    if config.get("lambda_user") == 0 and config.get("lambda_item") == 0:
        parts.append(f"{without} aux")
    elif non_default_lambda(config):
        parts.append(f"λ={non_default_lambda(config)}")
    return parts


def describe(config: dict) -> str:
    """A short name of the method and the settings that tell its runs apart, e.g. "hdccf, ω=0/0, τ=0.7, dot"."""
    loss = config.get("loss", "hdccf")
    parts = [loss]
    if loss == "hdccf":
        parts += hdccf_variant(config)
    parts += sampling_variant(config)
    if loss != "bpr":
        if config.get("temperature") is not None:
            parts.append(f"τ={config['temperature']:g}")
        parts.append(config.get("similarity", "dot"))
    parts.append(f"{config.get('split', 'auto')} split")
    prior = config.get("item_prior", "none")
    if prior == "tune":
        parts.append("prior tuned")
    elif prior not in ("none", None):
        parts.append("prior α=τ")
    return ", ".join(parts)


def hyperparameters(config: dict) -> str:
    """The tunable settings of a run that apply to its loss, e.g. "lr 0.001, τ 0.5, wd 0, λ 1/1"."""
    loss = config.get("loss", "hdccf")
    parts = [f"lr {config.get('lr')}"]
    if loss != "bpr":
        parts.append(f"τ {config.get('temperature')}")
    parts.append(f"wd {config.get('weight_decay', 0.0):g}")
    if loss == "hdccf":
        parts.append(f"λ {config.get('lambda_user', 1.0):g}/{config.get('lambda_item', 1.0):g}")
        if omegas(config):
            parts.append(f"ω {omegas(config)}")
    parts += sampling_variant(config)
    return ", ".join(parts)


def selection(result: dict) -> tuple[str, str]:
    """(protocol, metric) that selected a run's epochs and α (JSONs from before the flags: sampled NDCG@10)."""
    config = result["config"]
    return config.get("select_protocol") or "sampled", config.get("select_metric") or "NDCG@10"


def kind(result: dict) -> str:
    """"leave-one-out" or "per user": which metrics a run's evaluation has."""
    return "per user" if "per_user" in (result.get("test") or result["valid"]) else "leave-one-out"


def one_kind(results: list[dict]) -> str:
    kinds = {kind(r) for r in results}
    if len(kinds) != 1:
        raise ValueError("results: leave-one-out runs (HR/NDCG@K) and per-user runs (Recall/NDCG@K on a given "
                         "test set) cannot share a table; summarise each data set on its own")
    return kinds.pop()


def per_run(paths: list[Path]) -> str:
    """One row per run, best validation selection metric first."""
    results = [read_json(path) for path in paths]
    one_kind(results)
    results.sort(key=lambda r: -r["valid"][selection(r)[0]][selection(r)[1]])
    protocol, metric = selection(results[0])
    second = ("sampled", "HR@10") if protocol != "per_user" else ("per_user", "NDCG@20")
    header = ["method", "hyperparameters", "seed", "best epoch / run", "α", f"valid {protocol} {metric}",
              f"valid {second[0]} {second[1]}", "wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        config = r["config"]
        cells = [describe(config), hyperparameters(config), str(config.get("seed")),
                 f"{r['best_epoch']}/{r['epochs_run']}", f"{r.get('prior_strength', 0):g}",
                 f"{r['valid'][selection(r)[0]][selection(r)[1]]:.4f}", f"{r['valid'][second[0]][second[1]]:.4f}",
                 f"{r['wall_seconds'] / 60:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def disambiguate(names: dict[str, str]) -> dict[str, str]:
    """Groups (keyed by their settings as JSON) whose names collide get the settings that differ appended."""
    out = dict(names)
    for name in set(names.values()):
        keys = [k for k, n in names.items() if n == name]
        if len(keys) < 2:
            continue
        settings = [json.loads(k) for k in keys]
        differing = sorted({k for c in settings for k in c if any(c.get(k) != o.get(k) for o in settings)})
        for key, config in zip(keys, settings):
            out[key] = name + ", " + ", ".join(f"{k} {config.get(k, '-')}" for k in differing)
    return out


def group_key(config: dict) -> str:
    """The settings that define a run's method, as JSON: runs with equal keys differ only in seed (or in
    settings their loss ignores) and are averaged together."""
    config = {"item_prior": "none", **config}  # JSONs from before --item-prior
    ignored = IGNORED | unused_settings(config)
    # a None setting is one the run did not use: JSONs from before a flag existed lack the key, and
    # a later flag left at its default is dropped, so that such runs group with the older ones
    return json.dumps({k: v for k, v in sorted(config.items())
                       if k not in ignored and v is not None and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])})


def group_runs(results: list[dict], label=describe) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Results grouped by :func:`group_key`, and each group's ``label`` of its config, made unique by
    :func:`disambiguate` (runs that differ only in, say, batch size get it appended)."""
    groups: dict[str, list[dict]] = {}
    names: dict[str, str] = {}
    for result in results:
        key = group_key(result["config"])
        groups.setdefault(key, []).append(result)
        names[key] = label(result["config"])
    return groups, disambiguate(names)


def metric_rows(rows: list[tuple[str, list[dict]]], split: str) -> str:
    """A Markdown table: one row per (name, runs), with the seed count and mean ± std of each metric."""
    columns = COLUMNS[one_kind([r for _, results in rows for r in results])]
    per_user = columns is COLUMNS["per user"]
    header = ["method", "seeds"] + [f"{'' if per_user else p + ' '}{m}" for p, m in columns]
    header += ["wall (min)"] if per_user else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, results in rows:
        cells = [name, str(len(results))]
        for protocol, metric in columns:
            values = [r[split][protocol][metric] for r in results]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {std:.4f}")
        if per_user:
            cells.append(f"{statistics.mean(r['wall_seconds'] for r in results) / 60:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(paths: list[Path], split: str = "test") -> str:
    groups, names = group_runs([read_json(path) for path in paths])
    return metric_rows([(names[key], results) for key, results in groups.items()], split)


#: The README's headline rows: each method at the setting its tuning chose (examples/results/README.md),
#: at the cpu preset's batch, on the chronological split. A row's runs are those whose config has every
#: listed value; they must form one group of :func:`group_key` (the seeds of one setting).
HEADLINE_BATCH = dict(split="auto", batch_size=512, pool=2, dim=64, item_prior="tune", logq=False, mixed_negatives=0)
HEADLINE = (
    ("HDCCF, dot, ω = 0, τ = 0.7", dict(loss="hdccf", similarity="dot", temperature=0.7, omega_user=0.0,
                                      omega_item=0.0, lambda_user=1.0, lambda_item=1.0, no_debias=False)),
    ("in-batch softmax, τ = 1.0", dict(loss="softmax", similarity="dot", temperature=1.0, lr=0.001,
                                      weight_decay=0.0)),
    ("BPR-MF, wd 0.001", dict(loss="bpr", lr=0.001, weight_decay=0.001)),
    # beyond the paper (OPTIONAL_ROWS): the sampling-bias correction, each at its tuning's choice
    ("in-batch softmax + logQ, τ = 1.5", dict(loss="softmax", similarity="dot", temperature=1.5, lr=0.001,
                                             weight_decay=0.0, logq=True)),
    ("HDCCF + logQ (w/o debias), τ = 0.7", dict(loss="hdccf", similarity="dot", temperature=0.7,
                                               lambda_user=1.0, lambda_item=1.0, no_debias=True, logq=True)),
    ("HDCCF + logQ + mixed, B′ = 1024, τ = 0.7", dict(loss="hdccf", similarity="dot", temperature=0.7,
                                                     omega_user=0.0, omega_item=0.0, lambda_user=1.0,
                                                     lambda_item=1.0, no_debias=False, logq=True,
                                                     mixed_negatives=1024)),
)


#: headline rows left out of a table whose results have none of their runs (Gowalla's: not run there yet)
OPTIONAL_ROWS = {"in-batch softmax + logQ, τ = 1.5", "HDCCF + logQ (w/o debias), τ = 0.7",
                 "HDCCF + logQ + mixed, B′ = 1024, τ = 0.7"}


def headline_rows(paths: list[Path]) -> list[tuple[str, list[dict]]]:
    """(name, runs sorted by seed) of every HEADLINE row; a row must match the seeds of one setting
    (a row of OPTIONAL_ROWS may match none and is then left out)."""
    results = [read_json(path) for path in paths]
    rows = []
    for name, settings in HEADLINE:
        wanted = {**HEADLINE_BATCH, **settings}
        runs = [r for r in results if all(setting(r["config"], k) == v for k, v in wanted.items())]
        settings_found = {group_key(r["config"]) for r in runs}
        if not runs and name in OPTIONAL_ROWS:
            continue
        if len(settings_found) != 1:
            raise ValueError(f"headline row {name!r}: expected the seeds of one setting among the results, "
                             f"found {len(runs)} runs of {len(settings_found)} settings")
        rows.append((name, sorted(runs, key=lambda r: r["config"]["seed"])))
    return rows


def margins(paths: list[Path], split: str = "test", tuned: bool = False) -> str:
    """Each HDCCF headline row (``tuned``: each HDCCF row of :func:`tuned_rows`) against the best
    baseline row on each metric (the paper's way: per metric, the baseline with the highest mean),
    in per cent of that baseline's mean."""
    rows = tuned_rows(paths) if tuned else headline_rows(paths)
    columns = COLUMNS[one_kind([r for _, runs in rows for r in runs])]
    mean = lambda runs, p, m: statistics.mean(r[split][p][m] for r in runs)  # noqa: E731
    baselines = [(n, runs) for n, runs in rows if not n.startswith("HDCCF")]
    header = ["HDCCF row"] + [f"{p} {m}" for p, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in rows:
        if not name.startswith("HDCCF"):
            continue
        cells = [name]
        for p, m in columns:
            best_name, best = max(((n, mean(b, p, m)) for n, b in baselines), key=lambda t: t[1])
            cells.append(f"{100 * (mean(runs, p, m) / best - 1):+.1f} % (vs {best_name.split(',')[0]})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The method families of a tuned table (Gowalla's): each row is the family's setting chosen by its
#: seed-0 run's validation selection metric among the family's settings, with every seed of it.
#: The paper's ablations are rows of their own (the loss without debiasing, without auxiliary terms).
def _family(loss: str, logq: bool = False, mixed: bool = False, debias=None, aux: bool = True):
    def match(c: dict) -> bool:
        if c.get("loss", "hdccf") != loss or bool(setting(c, "logq")) != logq:
            return False
        if bool(setting(c, "mixed_negatives")) != mixed:
            return False
        if loss == "hdccf":
            has_aux = (c.get("lambda_user", 1.0), c.get("lambda_item", 1.0)) != (0.0, 0.0)
            if has_aux != aux or (debias is not None and bool(c.get("no_debias")) == debias):
                return False
        return all(setting(c, k) == v for k, v in HEADLINE_BATCH.items() if k not in ("logq", "mixed_negatives"))
    return match


FAMILIES = (
    ("HDCCF", _family("hdccf", debias=True)),
    ("in-batch softmax", _family("softmax")),
    ("BPR-MF", _family("bpr")),
    ("in-batch softmax + logQ", _family("softmax", logq=True)),
    ("HDCCF + logQ", _family("hdccf", logq=True)),  # with and without debiasing: settings of one family
    ("HDCCF + logQ + mixed", _family("hdccf", logq=True, mixed=True)),
    ("HDCCF w/o debias", _family("hdccf", debias=False)),
    ("HDCCF w/o aux", _family("hdccf", debias=True, aux=False)),
)


def choice_label(c: dict) -> str:
    """The settings a family's tuning chooses among, e.g. "τ = 0.7, w/o debias, B′ = 1024"."""
    parts = [f"τ = {c['temperature']:g}"] if c.get("loss", "hdccf") != "bpr" else [f"wd {c.get('weight_decay', 0):g}"]
    if c.get("loss", "hdccf") == "hdccf":
        parts += hdccf_variant(c, without="w/o")
    if setting(c, "mixed_negatives"):
        parts.append(f"B′ = {setting(c, 'mixed_negatives')}")
    return ", ".join(parts)


def tuned_rows(paths: list[Path]) -> list[tuple[str, list[dict]]]:
    """(name, runs sorted by seed) of every family of :data:`FAMILIES` with runs among ``paths``: the
    setting whose seed-0 run scores best on the validation selection metric, named with the number
    of settings tried and the choice."""
    results = [read_json(path) for path in paths]
    rows = []
    for name, match in FAMILIES:
        groups: dict[str, list[dict]] = {}
        for r in results:
            if match(r["config"]):
                groups.setdefault(group_key(r["config"]), []).append(r)
        if not groups:
            continue

        def score(runs):
            first = min(runs, key=lambda r: r["config"]["seed"])
            protocol, metric = selection(first)
            return first["valid"][protocol][metric]

        runs = sorted(max(groups.values(), key=score), key=lambda r: r["config"]["seed"])
        tried = f"{len(groups)} setting{'s' if len(groups) > 1 else ''}"
        rows.append((f"{name} ({tried}): {choice_label(runs[0]['config'])}", runs))
    return rows


def headline(paths: list[Path], split: str = "test") -> str:
    """The headline table of README.md: the HEADLINE rows, mean ± std over each setting's seeds."""
    return metric_rows(headline_rows(paths), split)


def run_label(c: dict) -> str:
    """A plot curve's name from a run's config ``c``: the loss, its ablation flags and τ."""
    if c["loss"] == "bpr":
        return "BPR"
    if c["loss"] == "softmax":
        parts = ["in-batch softmax"]
    else:
        parts = ["HDCCF", *hdccf_variant(c, without="w/o")]
    parts += sampling_variant(c)
    if c.get("temperature") is not None:
        parts.append(f"τ={c['temperature']:g}")
    if c["loss"] == "hdccf" and c.get("similarity") != "modulated":
        parts.append(f"({c.get('similarity')})")
    return " ".join(parts)


def validation_curves(results: list[dict], protocol: str = "sampled", metric: str = "NDCG@10") -> dict[str, list[list[float]]]:
    """Label → one list of per-epoch validation values per seed."""
    groups, names = group_runs(results, label=run_label)
    return {names[key]: [[h["valid"][protocol][metric] for h in r["history"] if "valid" in h] for r in runs]
            for key, runs in groups.items()}


def plot(paths: list[Path], out: Path, protocol: str = "sampled", metric: str = "NDCG@10") -> None:
    """Draw the validation ``metric`` per epoch of every group of runs into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = validation_curves([read_json(path) for path in paths], protocol, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in sorted(curves.items()):
        n = min(len(r) for r in runs)
        arr = np.array([r[:n] for r in runs])
        epochs = np.arange(1, n + 1)
        ax.plot(epochs, arr.mean(0), marker="o", ms=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, arr.min(0), arr.max(0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric} ({protocol})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path,
                        help="results JSON files (default: examples/results/ml1m/*.json and ml1m_logq/*.json)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--per-run", action="store_true",
                      help="one row per run with its hyperparameters and validation score (a tuning log)")
    mode.add_argument("--markdown", action="store_true",
                      help="the headline table of README.md: each method at its chosen setting, chronological split")
    mode.add_argument("--margins", action="store_true",
                      help="each HDCCF row of the headline table against the best baseline row, per metric, in %%")
    mode.add_argument("--tuned", action="store_true",
                      help="each method family at the setting its seed-0 validation chose (README's Gowalla table)")
    mode.add_argument("--tuned-margins", action="store_true",
                      help="--margins of the --tuned rows")
    mode.add_argument("--plot", metavar="PNG", type=Path, default=None,
                      help="draw validation --metric per epoch (--protocol) of each group of runs into PNG")
    parser.add_argument("--protocol", default=None, choices=["sampled", "full", "per_user"],
                        help="with --plot (default: the runs' selection protocol)")
    parser.add_argument("--metric", default=None, help="with --plot (default: the runs' selection metric)")
    args = parser.parse_args(argv)
    paths = args.results or default_results()
    if args.plot:
        chosen = selection(read_json(paths[0])) if paths else ("sampled", "NDCG@10")
        plot(paths, args.plot, args.protocol or chosen[0], args.metric or chosen[1])
    elif args.markdown:
        print(headline(paths, args.split))
    elif args.margins or args.tuned_margins:
        print(margins(paths, args.split, tuned=args.tuned_margins))
    elif args.tuned:
        print(metric_rows(tuned_rows(paths), args.split))
    else:
        print(per_run(paths) if args.per_run else summarize(paths, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
