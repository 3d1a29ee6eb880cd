"""Milliseconds per training step of the HDCCF objective on the CPU, per similarity, on real
batches: the step as it was before the CPU speed-up against the step as it is, in one process.

    python bench/train_step_cpu.py --data-dir ../shared/data                  # ML-1M: dot, cosine, modulated
    python bench/train_step_cpu.py --data-dir ../shared/data --similarities dot modulated --threads 1
    python bench/train_step_cpu.py --data-dir ../shared/data --dataset gowalla --similarities dot

One Adam step (forward, backward, update) of ``HDCCFObjective`` on the first batches of the
sampler's epoch 0, at the example script's cpu preset (M = 512, P = 2, d = 64, τ = 0.7, ω = 0),
after one warm-up step; prints ms per step of each, their ratio and the implied minutes per
epoch. "previous" is the step at the start of the speed-up: the previous reference
(``bench/reference_previous.py``, swapped in for the loss's reference backend, the one module
attribute ``hdccf_triton.loss.reference``), one embedding lookup per operand
(``previous_objective_loss``) and the default (foreach) Adam; "current" is the step
``examples/train_ml1m.py`` takes: the current reference, ``HDCCFObjective`` and fused Adam.
``--loss-only`` swaps only the reference (same objective and optimizer for both). A wall-clock
figure of this machine at the time: run it on an otherwise idle CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_previous  # noqa: E402
from reference_previous import previous_objective_loss  # noqa: E402

import hdccf_triton.loss  # noqa: E402

from hdccf_triton import EmbeddingModel, HDCCFObjective, InBatchSampler, ModulatedSimilarity, load_dataset


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the data")
    p.add_argument("--dataset", default="ml-1m", help="ml-1m, gowalla, ... (as train_ml1m.py --dataset)")
    p.add_argument("--loss-only", action="store_true", help="previous differs only in the reference backend")
    p.add_argument("--similarities", nargs="+", default=["dot", "cosine", "modulated"],
                   choices=["dot", "cosine", "modulated"])
    p.add_argument("-M", "--batch-size", type=int, default=512)
    p.add_argument("-P", "--pool", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per similarity")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps: expected at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = load_dataset(args.dataset, args.data_dir, seed=0, progress=False)
    sampler = InBatchSampler(ds.train_users, ds.train_items, ds.num_users, ds.num_items,
                             batch_size=args.batch_size, num_pool=args.pool, seed=0)
    index = sampler.interaction_index()
    epoch = sampler.epoch_batches(0)
    batches = [next(epoch) for _ in range(args.steps + 1)]
    print(f"{args.dataset}, threads {torch.get_num_threads()}, M = {args.batch_size}, P = {args.pool}, "
          f"d = {args.dim}; previous = {'the previous reference only' if args.loss_only else 'the previous step'}")
    current = hdccf_triton.loss.reference
    previous = types.SimpleNamespace(per_row_loss=reference_previous.per_row_loss)
    for name in args.similarities:
        per_step = {}
        for label, implementation in (("previous", previous), ("current", current)):
            hdccf_triton.loss.reference = implementation
            try:
                per_step[label] = time_steps(name, args, ds, index, batches,
                                             previous=label == "previous" and not args.loss_only)
            finally:
                hdccf_triton.loss.reference = current
        ratio = per_step["previous"] / per_step["current"]
        print(f"{name:>10}: previous {1000 * per_step['previous']:7.0f} ms/step, current "
              f"{1000 * per_step['current']:7.0f} ms/step ({ratio:.2f}x), "
              f"{per_step['current'] * len(sampler) / 60:6.1f} min/epoch ({len(sampler)} steps)", flush=True)


def time_steps(name, args, ds, index, batches, previous: bool) -> float:
    """Seconds per Adam step of a fresh model (seed 0), after one warm-up step."""
    torch.manual_seed(0)
    similarity = ModulatedSimilarity(args.dim) if name == "modulated" else name
    model = EmbeddingModel(ds.num_users, ds.num_items, args.dim, similarity)
    objective = HDCCFObjective(model, index, temperature=0.7, omega_user=0.0, omega_item=0.0)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3, fused=not previous)
    for i, batch in enumerate(batches):
        if i == 1:  # after the warm-up step
            start = time.perf_counter()
        loss = previous_objective_loss(objective, batch) if previous else objective(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / args.steps


if __name__ == "__main__":
    main()
