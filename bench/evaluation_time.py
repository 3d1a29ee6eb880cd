"""Time and peak extra memory of one evaluation of the test split, with a random d = 64 model.

    python bench/evaluation_time.py --dataset gowalla --data-dir ../shared/data   # per-user Recall/NDCG@K
    python bench/evaluation_time.py --dataset ml-1m                               # sampled and full (HR/NDCG@K)
    python bench/evaluation_time.py --similarity modulated --threads 1

Each protocol the evaluator computes on the data set (``Evaluator.protocols``) is timed on its
own, after one warm-up evaluation, at the cut-offs the training script uses (10, 20, 50). The
peak extra memory is the rise of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` before each timed evaluation) above the resident set before it.
``--prior-scan`` also times the scan of the 8 prior strengths of ``train_ml1m.py`` (one
evaluation of the validation split with every α, the model scored once).

The script uses only ``Evaluator.from_dataset`` and ``Evaluator.evaluate(model, split)``, so it
also runs against an older checkout of the library (``PYTHONPATH=OLD_CHECKOUT``), for a before/after
comparison. With ``--similarity modulated`` the full ranking is also timed with the literal
eq. 8 (g on the concatenation [e_i ; e_u ; e_i ⊙ e_u] of 64-user broadcast blocks, how
``score_all`` scored before ``modulated_score_matrix``), in the same process, with the ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from hdccf_triton import EmbeddingModel, Evaluator, ModulatedSimilarity, load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KS = (10, 20, 50)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def timed(evaluate):
    """(seconds, peak extra MiB or None, result) of one call of ``evaluate()``."""
    resettable = _reset_peak()
    before = _status_kib("VmRSS")
    t = time.perf_counter()
    result = evaluate()
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    extra = (peak - before) / 1024 if resettable and peak is not None and before is not None else None
    return seconds, extra, result


def headline(result: dict) -> str:
    if "per_user" in result:
        return f"Recall@20 {result['per_user']['Recall@20']:.4f}"
    return f"HR@10 {next(iter(result.values()))['HR@10']:.4f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-1m", help="ml-1m, gowalla, ... (as train_ml1m.py --dataset)")
    p.add_argument("--data-dir", default=os.environ.get("HDCCF_DATA_DIR") or (str(SHARED) if SHARED.exists() else None))
    p.add_argument("--similarity", choices=["dot", "modulated"], default="dot")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prior-scan", action="store_true", help="also time the 8-strength prior scan")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = load_dataset(args.dataset, args.data_dir, progress=False)
    t0 = time.perf_counter()
    evaluator = Evaluator.from_dataset(ds)
    built = time.perf_counter() - t0
    sim = ModulatedSimilarity(64) if args.similarity == "modulated" else "dot"
    model = EmbeddingModel(ds.num_users, ds.num_items, 64, sim).eval()
    protocols = getattr(evaluator, "protocols", ("full", "sampled"))
    print(f"{args.dataset}: {ds.num_users:,} users x {ds.num_items:,} items, "
          f"{evaluator.heldout['test'][0].numel():,} test pairs, {args.similarity}, d = 64, "
          f"{torch.get_num_threads()} threads; evaluator built in {built:.2f} s")
    for protocol in protocols:
        run = lambda: evaluator.evaluate(model, "test", ks=KS, protocols=(protocol,))  # noqa: E731
        run()  # warm-up (the sampled protocol draws its negatives here)
        seconds, extra, result = timed(run)
        mem = f", peak extra memory {extra:.0f} MiB" if extra is not None else ""
        print(f"  test, {protocol}: {seconds:.2f} s{mem} (random model {headline(result)})", flush=True)
    if args.prior_scan:
        from hdccf_triton.models import log_frequency_prior, select_prior_strength

        grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0]
        log_counts = log_frequency_prior(ds.train_items, ds.num_items, 1.0)
        seconds, extra, (alpha, _) = timed(lambda: select_prior_strength(model, evaluator, log_counts, grid, ks=KS))
        mem = f", peak extra memory {extra:.0f} MiB" if extra is not None else ""
        print(f"  prior scan of {len(grid)} strengths on valid: {seconds:.2f} s{mem} (α = {alpha})")
    if args.similarity == "modulated":
        items = model.item_table.weight

        @torch.no_grad()
        def literal_score_all(users):
            U = model.user_table(users)
            return torch.cat([sim(u[:, None, :], items[None]) for u in U.split(64)]) + model.item_prior

        full = timed(lambda: evaluator.evaluate(model, "test", ks=KS, protocols=("full",)))[0]
        seconds, _, result = timed(lambda: evaluator.evaluate(model, "test", ks=KS, protocols=("full",),
                                                              score_all=literal_score_all))
        print(f"full ranking with the literal eq. 8: {seconds:.2f} s ({headline(result)}); "
              f"score_all is {seconds / full:.1f}x faster")


if __name__ == "__main__":
    main()
