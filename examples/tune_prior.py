"""Re-run the final evaluation of finished train_ml1m.py runs with --item-prior tune.

    python examples/tune_prior.py runs/*/results.json
    python examples/tune_prior.py examples/results/ml1m/*.json --data-dir ../shared/data

For each results JSON: reload the data set and the best checkpoint named in it, choose the
prior strength α of α·log q(i) from --prior-grid on the validation split (as train_ml1m.py
does at the end of a run), evaluate the test split with it, and write the JSON back with the
new "valid", "test", "prior_strength", "prior_scan" and raw-score metrics. The training
history, the epochs and the wall time are kept: a run trained and evaluated today gives the
same file, because epoch selection is unchanged (α = τ for the in-batch losses, 0 for bpr).

The JSON is rewritten atomically (an interrupted rewrite leaves the old file), and the checkpoint's
checksum is verified first: a damaged checkpoint or JSON is an error naming the file, not new metrics.

The run is rebuilt from the "config" its JSON holds, with the public API of hdccf_triton only;
settings that JSONs of older runs lack take train_ml1m.py's defaults (DEFAULTS below).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from hdccf_triton import Evaluator, log_frequency_prior, select_prior_strength
from hdccf_triton.atomic import load_checked, read_json, write_json
from hdccf_triton.data import DownloadError, load_dataset
from hdccf_triton.models import EmbeddingModel
from hdccf_triton.similarity import ModulatedSimilarity

#: train_ml1m.py's defaults of the settings the evaluation depends on
DEFAULTS = dict(dataset="ml-1m", split="auto", min_item_interactions=5, similarity="dot", normalize=False,
                seed=0, select_protocol=None, select_metric=None, ks=[10, 50],
                prior_grid=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0])


def rebuild(config: dict, data_dir: str | None):
    """(data set, evaluator, untrained model) of a run, from its saved config."""
    try:
        ds = load_dataset(config["dataset"], data_dir, seed=config["seed"], split=config["split"],
                          min_item_interactions=config["min_item_interactions"], progress=False)
    except (FileNotFoundError, DownloadError) as err:
        sys.exit(f"{err}\nPoint --data-dir (or $HDCCF_DATA_DIR) at a folder holding a copy of the data.")
    similarity = config["similarity"]
    if similarity == "modulated":
        similarity = ModulatedSimilarity(config["dim"], normalize=config["normalize"])
    model = EmbeddingModel(ds.num_users, ds.num_items, config["dim"], similarity)
    return ds, Evaluator.from_dataset(ds, seed=config["seed"]), model


def retune(path: Path, data_dir: str | None, prior_grid: list[float] | None, threads: int | None) -> dict:
    result = read_json(path)
    config = result["config"]
    settings = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    grid = [float(a) for a in prior_grid or config.get("prior_grid") or DEFAULTS["prior_grid"]]
    ks = [int(k) for k in settings["ks"]]
    if threads:
        torch.set_num_threads(threads)
    ds, evaluator, model = rebuild(settings, data_dir or config.get("data_dir") or os.environ.get("HDCCF_DATA_DIR"))
    # checkpoints from before the prior buffer existed lack only "item_prior"
    if not result.get("checkpoint"):
        raise ValueError(f"{path}: names no checkpoint (the run wrote none), nothing to re-evaluate")
    state = load_checked(result["checkpoint"], what="checkpoint", map_location="cpu")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if set(missing) - {"item_prior"} or unexpected:
        raise ValueError(f"{result['checkpoint']}: does not match the run's model "
                         f"(missing {missing}, unexpected {unexpected})")
    model.eval()
    log_counts = log_frequency_prior(ds.train_items, ds.num_items, 1.0)
    for key in ("valid_without_prior", "test_without_prior", "prior_scan"):
        result.pop(key, None)
    # α chosen on validation and left set on the model, then one test evaluation; raw scores beside
    alpha, scan = select_prior_strength(model, evaluator, log_counts, grid, split="valid",
                                        protocol=settings["select_protocol"], metric=settings["select_metric"], ks=ks)
    result["prior_scan"] = {str(a): v for a, v in scan.items()}
    scored = {split: evaluator.evaluate(model, split, ks=ks) for split in ("valid", "test")}
    result.update(scored, prior_strength=alpha)
    if alpha:
        model.set_item_prior(None)
        result.update({f"{split}_without_prior": evaluator.evaluate(model, split, ks=ks) for split in scored})
    config.update(item_prior="tune", prior_grid=grid)
    write_json(path, result)  # whole or not at all: an interrupted rewrite leaves the old file
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results JSONs of train_ml1m.py (rewritten in place)")
    p.add_argument("--data-dir", default=None, help="where the data is (default: the run's --data-dir)")
    p.add_argument("--prior-grid", type=float, nargs="+", default=None, help="candidate alpha (default: the run's, else the script's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected an integer >= 1, got {args.threads}")
    for path in args.results:
        try:
            r = retune(path, args.data_dir, args.prior_grid, args.threads)
        except (OSError, ValueError) as err:  # CorruptFileError is a ValueError
            sys.exit(f"tune_prior.py: error: {err}")
        print(f"{path}: alpha {r['prior_strength']}  test " + "  ".join(
            f"{protocol} {name} {value:.4f}" for protocol, metrics in r["test"].items()
            for name, value in metrics.items() if name in ("NDCG@10", "Recall@20", "NDCG@20")))


if __name__ == "__main__":
    main()
