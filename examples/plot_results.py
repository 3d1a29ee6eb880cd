"""Draw validation NDCG@10 per epoch of several training runs into one PNG.

    python examples/plot_results.py runs/*/results.json --out docs/valid_ndcg.png

Each results JSON is the one examples/train_ml1m.py writes. Runs that differ only in their seed
are averaged, with their spread shaded; each curve is labelled by its loss and ablation flags,
plus the settings that tell it apart from a same-named curve (e.g. "batch_size 128").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from summarize_results import group_runs, hdccf_variant


def run_label(c: dict) -> str:
    """The curve's name from a run's config ``c``: the loss, its ablation flags and τ."""
    if c["loss"] == "bpr":
        return "BPR"
    if c["loss"] == "softmax":
        parts = ["in-batch softmax"]
    else:
        parts = ["HDCCF", *hdccf_variant(c, without="w/o")]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results JSON files")
    p.add_argument("--out", default="valid_ndcg.png")
    p.add_argument("--protocol", default="sampled", choices=["sampled", "full"])
    p.add_argument("--metric", default="NDCG@10")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = validation_curves([json.loads(Path(path).read_text()) for path in args.results],
                               args.protocol, args.metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in sorted(curves.items()):
        n = min(len(r) for r in runs)
        arr = np.array([r[:n] for r in runs])
        epochs = np.arange(1, n + 1)
        mean = arr.mean(0)
        ax.plot(epochs, mean, marker="o", ms=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, arr.min(0), arr.max(0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {args.metric} ({args.protocol})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
