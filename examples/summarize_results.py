"""Summarise results JSONs of train_ml1m.py into a Markdown table: mean ± std over seeds.

    python examples/summarize_results.py runs/*/results.json
    python examples/summarize_results.py examples/results/ml1m/*.json --split test

Runs are grouped by everything in their config except the seed and the output paths; each
group gives one row with the number of seeds and, for HR@10, NDCG@10 and NDCG@50 under the
sampled and the full protocol, the mean ± the sample standard deviation over its seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = ("HR@10", "NDCG@10", "NDCG@50")
#: config keys that do not define a method
IGNORED = {"seed", "run_dir", "out", "no_progress", "threads", "data_dir", "device", "distributed"}


def non_default_omega(config: dict) -> str | None:
    """"ω_u/ω_i" of a debiased HDCCF run whose ω differ from train_ml1m.py's 0.05, else None."""
    omegas = (config.get("omega_user", 0.05), config.get("omega_item", 0.05))
    if config.get("loss", "hdccf") != "hdccf" or config.get("no_debias") or omegas == (0.05, 0.05):
        return None
    return f"{omegas[0]:g}/{omegas[1]:g}"


def describe(config: dict) -> str:
    """A short name of the method and its non-default settings."""
    loss = config.get("loss", "hdccf")
    parts = [loss]
    if loss == "hdccf":
        if config.get("no_debias"):
            parts.append("no debias")
        elif non_default_omega(config):
            parts.append(f"ω={non_default_omega(config)}")
        if config.get("lambda_user") == 0 and config.get("lambda_item") == 0:
            parts.append("no aux")
        parts.append(config.get("similarity", "dot"))
    elif loss == "softmax":
        parts.append(config.get("similarity", "dot"))
    parts.append(f"{config.get('split', 'auto')} split")
    prior = config.get("item_prior", "none")
    if prior == "tune":
        parts.append("prior tuned")
    elif prior not in ("none", None):
        parts.append("prior α=τ")
    return ", ".join(parts)


def summarize(paths: list[Path], split: str = "test") -> str:
    groups: dict[str, list[dict]] = {}
    names: dict[str, str] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        config = {"item_prior": "none", **result["config"]}  # JSONs from before --item-prior
        ignored = IGNORED | ({"temperature"} if config.get("loss") == "bpr" else set())  # BPR has no τ
        key = json.dumps({k: v for k, v in sorted(config.items()) if k not in ignored})
        groups.setdefault(key, []).append(result)
        names[key] = describe(config)
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
    args = parser.parse_args(argv)
    print(summarize(args.results, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
