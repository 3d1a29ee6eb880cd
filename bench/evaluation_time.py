"""Time of one evaluation (both protocols) on ML-1M with a random d=64 dot model (issue 5).

    python bench/evaluation_time.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from hdccf_triton import EmbeddingModel, Evaluator, load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("HDCCF_DATA_DIR") or (str(SHARED) if SHARED.exists() else None))
    args = p.parse_args(argv)
    ds = load_dataset("ml-1m", args.data_dir)
    t0 = time.perf_counter()
    evaluator = Evaluator.from_dataset(ds)
    t1 = time.perf_counter()
    model = EmbeddingModel(ds.num_users, ds.num_items, 64).eval()
    timings = {}
    for protocol in ("full", "sampled"):
        evaluator.evaluate(model, "test", protocols=(protocol,))  # warm-up (sampled: draws negatives)
        t = time.perf_counter()
        result = evaluator.evaluate(model, "test", protocols=(protocol,))
        timings[protocol] = (time.perf_counter() - t, result[protocol]["HR@10"])
    print(f"ML-1M, {ds.num_users:,} users x {ds.num_items:,} items, {torch.get_num_threads()} threads: "
          f"evaluator built in {t1 - t0:.2f} s; " +
          "; ".join(f"{k} ranking {v[0]:.2f} s (random model HR@10 {v[1]:.4f})" for k, v in timings.items()))


if __name__ == "__main__":
    main()
