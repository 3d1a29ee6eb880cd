"""Re-run the final evaluation of finished train_ml1m.py runs with --item-prior tune.

    python examples/tune_prior.py runs/*/results.json
    python examples/tune_prior.py examples/results/ml1m/*.json --data-dir ../shared/data

For each results JSON: reload the data set and the best checkpoint named in it, choose the
prior strength α of α·log q(i) from --prior-grid on the validation split (as train_ml1m.py
does at the end of a run), evaluate the test split with it, and write the JSON back with the
new "valid", "test", "prior_strength", "prior_scan" and raw-score metrics. The training
history, the epochs and the wall time are kept: a run trained and evaluated today gives the
same file, because epoch selection is unchanged (α = τ for the in-batch losses, 0 for bpr).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hdccf_triton import Evaluator, log_frequency_prior
from train_ml1m import build_model, final_evaluation, load_data, parse_args


def retune(path: Path, data_dir: str | None, prior_grid: list[float] | None, threads: int | None) -> dict:
    result = json.loads(path.read_text())
    config = result["config"]
    # the run's own flags, re-parsed so that options added since get their defaults
    argv = ["--loss", config["loss"], "--similarity", config["similarity"], "--dim", str(config["dim"]),
            "--dataset", config["dataset"], "--split", config["split"], "--seed", str(config["seed"]),
            "--temperature", str(config["temperature"]), "--select-protocol", config["select_protocol"],
            "--min-item-interactions", str(config["min_item_interactions"]), "--ks", *map(str, config["ks"])]
    if config.get("normalize"):
        argv.append("--normalize")
    if data_dir or config.get("data_dir"):
        argv += ["--data-dir", data_dir or config["data_dir"]]
    prior_grid = prior_grid or config.get("prior_grid")
    if prior_grid:
        argv += ["--prior-grid", *map(str, prior_grid)]
    args = parse_args(argv)
    if threads:
        torch.set_num_threads(threads)
    ds = load_data(args, progress=False)
    evaluator = Evaluator.from_dataset(ds, seed=args.seed)
    model = build_model(args, ds, "cpu")
    # checkpoints from before the prior buffer existed lack only "item_prior"
    missing, unexpected = model.load_state_dict(torch.load(result["checkpoint"], map_location="cpu")["model"],
                                                strict=False)
    if set(missing) - {"item_prior"} or unexpected:
        raise ValueError(f"{result['checkpoint']}: does not match the run's model "
                         f"(missing {missing}, unexpected {unexpected})")
    log_counts = log_frequency_prior(ds.train_items, ds.num_items, 1.0)
    for key in ("valid_without_prior", "test_without_prior", "prior_scan"):
        result.pop(key, None)
    result.update(final_evaluation(args, model, evaluator, log_counts))
    config.update(item_prior=args.item_prior, prior_grid=args.prior_grid)
    path.write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results JSONs of train_ml1m.py (rewritten in place)")
    p.add_argument("--data-dir", default=None, help="where the data is (default: the run's --data-dir)")
    p.add_argument("--prior-grid", type=float, nargs="+", default=None, help="candidate alpha (default: the run's, else the script's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = p.parse_args(argv)
    for path in args.results:
        r = retune(path, args.data_dir, args.prior_grid, args.threads)
        print(f"{path}: alpha {r['prior_strength']}  test sampled NDCG@10 {r['test']['sampled']['NDCG@10']:.4f}"
              f"  full NDCG@10 {r['test']['full']['NDCG@10']:.4f}")


if __name__ == "__main__":
    main()
