"""Time of one evaluation (both protocols) on ML-1M with a random d=64 model (issue 5).

    python bench/evaluation_time.py [--data-dir ../shared/data]
    python bench/evaluation_time.py --similarity modulated --threads 1

With ``--similarity modulated`` the full ranking is also timed with the literal eq. 8 (g on the
concatenation [e_i ; e_u ; e_i ⊙ e_u] of 64-user broadcast blocks, how ``score_all`` scored
before ``modulated_score_matrix``), in the same process, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from hdccf_triton import EmbeddingModel, Evaluator, ModulatedSimilarity, load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(evaluator, model, protocol, **callbacks):
    """(seconds, HR@10) of one evaluation of the test split, after a warm-up one."""
    evaluator.evaluate(model, "test", protocols=(protocol,), **callbacks)  # sampled: draws negatives
    t = time.perf_counter()
    result = evaluator.evaluate(model, "test", protocols=(protocol,), **callbacks)
    return time.perf_counter() - t, result[protocol]["HR@10"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("HDCCF_DATA_DIR") or (str(SHARED) if SHARED.exists() else None))
    p.add_argument("--similarity", choices=["dot", "modulated"], default="dot")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = load_dataset("ml-1m", args.data_dir)
    t0 = time.perf_counter()
    evaluator = Evaluator.from_dataset(ds)
    t1 = time.perf_counter()
    sim = ModulatedSimilarity(64) if args.similarity == "modulated" else "dot"
    model = EmbeddingModel(ds.num_users, ds.num_items, 64, sim).eval()
    timings = {protocol: timed(evaluator, model, protocol) for protocol in ("full", "sampled")}
    print(f"ML-1M, {ds.num_users:,} users x {ds.num_items:,} items, {args.similarity}, "
          f"{torch.get_num_threads()} threads: evaluator built in {t1 - t0:.2f} s; " +
          "; ".join(f"{k} ranking {v[0]:.2f} s (random model HR@10 {v[1]:.4f})" for k, v in timings.items()))
    if args.similarity == "modulated":
        items = model.item_table.weight

        @torch.no_grad()
        def literal_score_all(users):
            U = model.user_table(users)
            return torch.cat([sim(u[:, None, :], items[None]) for u in U.split(64)]) + model.item_prior

        seconds, hr = timed(evaluator, model, "full", score_all=literal_score_all)
        print(f"full ranking with the literal eq. 8: {seconds:.2f} s (HR@10 {hr:.4f}); "
              f"score_all is {seconds / timings['full'][0]:.1f}x faster")


if __name__ == "__main__":
    main()
