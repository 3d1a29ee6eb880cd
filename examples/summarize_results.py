"""Summarise results JSONs of train_ml1m.py into a Markdown table: mean ± std over seeds.

    python examples/summarize_results.py runs/*/results.json
    python examples/summarize_results.py examples/results/ml1m/*.json --split test
    python examples/summarize_results.py examples/results/ml1m_tuning/*.json --per-run

Runs are grouped by everything in their config except the seed and the output paths; each
group gives one row with the number of seeds and, for HR@10, NDCG@10 and NDCG@50 under the
sampled and the full protocol, the mean ± the sample standard deviation over its seeds.
With `--per-run`, each run gives one row instead: its hyperparameters, epochs, the tuned prior
strength and its validation sampled NDCG@10 (the selection criterion), best first: a tuning log.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = ("HR@10", "NDCG@10", "NDCG@50")
#: config keys that do not define a method
IGNORED = {"seed", "run_dir", "out", "no_progress", "threads", "data_dir", "device", "distributed", "save_data"}


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
    return ", ".join(parts)


def per_run(paths: list[Path]) -> str:
    """One row per run, best validation sampled NDCG@10 first."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    results.sort(key=lambda r: -r["valid"]["sampled"]["NDCG@10"])
    header = ["method", "hyperparameters", "seed", "best epoch / run", "α", "valid sampled NDCG@10",
              "valid sampled HR@10", "wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        config = r["config"]
        cells = [describe(config), hyperparameters(config), str(config.get("seed")),
                 f"{r['best_epoch']}/{r['epochs_run']}", f"{r.get('prior_strength', 0):g}",
                 f"{r['valid']['sampled']['NDCG@10']:.4f}", f"{r['valid']['sampled']['HR@10']:.4f}",
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
    # a None setting is one the run did not use: JSONs from before a flag existed lack the key
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in ignored and v is not None})


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


def summarize(paths: list[Path], split: str = "test") -> str:
    groups, names = group_runs([json.loads(Path(path).read_text()) for path in paths])
    header = ["method", "seeds"] + [f"{p} {m}" for p in ("sampled", "full") for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, results in groups.items():
        cells = [names[key], str(len(results))]
        for protocol in ("sampled", "full"):
            for metric in METRICS:
                values = [r[split][protocol][metric] for r in results]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.4f} ± {std:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--per-run", action="store_true",
                        help="one row per run with its hyperparameters and validation score (a tuning log)")
    args = parser.parse_args(argv)
    print(per_run(args.results) if args.per_run else summarize(args.results, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
