"""Forward and backward of the PyTorch reference on the CPU: the previous implementation
(``bench/reference_previous.py``) against the current one, in one process.

    python bench/reference_large.py                                   # the grid below, about 15 minutes on 2 cores
    python bench/reference_large.py -M 8192 -P 4 --threads 2          # one shape
    python bench/reference_large.py -M 2048 --memory                  # also the peak memory of each
    python bench/reference_large.py -M 8192 -P 4 --threads 2 --implementations current   # its peak RSS alone

Grid: M in {512, 2048, 8192}, P in {2, 4}, d = 64, float32, 1 and 2 threads, dot and cosine;
ω = 0.1 and the 1,000,000 random training pairs over ML-1M's 6,040 users × 3,416 items. Each
row prints the seconds of forward and backward (the best of ``--repeat`` runs after one
warm-up), the ratio previous ÷ current, and the largest relative difference of the loss and
the gradients between the two. With ``--memory`` the peak bytes live above the inputs during
forward + backward (every tensor storage aten creates, tracked from creation to release) of
each implementation are measured in a separate, untimed run. The process's peak RSS closes
the output.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_previous  # noqa: E402
from harness import LiveBytes  # noqa: E402

from hdccf_triton import InteractionIndex, LossOptions  # noqa: E402
from hdccf_triton.backends import reference  # noqa: E402
from hdccf_triton.terms import reduce_similarity  # noqa: E402
from hdccf_triton.validation import validate_inputs  # noqa: E402

IMPLEMENTATIONS = {"previous": reference_previous.per_row_loss, "current": reference.per_row_loss}


def make_case(M, P, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    nu, ni = 6040, 3416
    index = InteractionIndex.from_pairs(torch.randint(0, nu, (1_000_000,), generator=g),
                                        torch.randint(0, ni, (1_000_000,), generator=g), nu, ni)
    emb = [torch.randn(*s, generator=g, dtype=dtype) * 0.1 for s in [(M, d), (M, d), (M, P, d), (M, P, d)]]
    ids = [torch.randint(0, nu, (M,), generator=g), torch.randint(0, ni, (M,), generator=g),
           torch.randint(0, ni, (M, P), generator=g), torch.randint(0, nu, (M, P), generator=g)]
    return emb, ids, index


def run(per_row_loss, emb, ids, index, options):
    """(loss, gradients, forward s, backward s) of one forward + backward."""
    leaves = [e.detach().clone().requires_grad_() for e in emb]
    inputs, opts = reduce_similarity(validate_inputs((*leaves, *ids), index, options.similarity), options)
    t0 = time.perf_counter()
    loss = per_row_loss(inputs, index, opts).mean()
    t1 = time.perf_counter()
    grads = torch.autograd.grad(loss, leaves)
    t2 = time.perf_counter()
    return loss.detach(), grads, t1 - t0, t2 - t1


def peak_mib(per_row_loss, emb, ids, index, options) -> float:
    leaves = [e.detach().clone().requires_grad_() for e in emb]
    inputs, opts = reduce_similarity(validate_inputs((*leaves, *ids), index, options.similarity), options)
    with LiveBytes(preexisting=[*leaves, *ids]) as probe:
        loss = per_row_loss(inputs, index, opts).mean()
        grads = torch.autograd.grad(loss, leaves)
        del loss, grads
    return probe.peak / 2**20


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-M", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("-P", type=int, nargs="+", default=[2, 4])
    p.add_argument("-d", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--similarities", nargs="+", default=["dot", "cosine"], choices=["dot", "cosine"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=1, help="timed runs per implementation (the best counts)")
    p.add_argument("--memory", action="store_true", help="also measure each implementation's peak memory")
    p.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS),
                   help="time only these (one alone: the process's peak RSS is its own)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"reference forward + backward, d = {args.d}, {args.dtype}, ω = 0.1: previous (bench/reference_previous.py) "
          "against current (hdccf_triton.backends.reference), seconds")
    header = "| M | P | similarity | threads | previous fwd | previous bwd | current fwd | current bwd | previous ÷ current | max rel. diff |"
    if args.memory:
        header += " previous MiB | current MiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for M, P, sim, threads in itertools.product(args.M, args.P, args.similarities, args.threads):
        torch.set_num_threads(threads)
        emb, ids, index = make_case(M, P, args.d, dtype)
        index.bitmap()  # built once, outside the measurement (as in training)
        options = LossOptions(similarity=sim, omega_user=0.1, omega_item=0.1)
        times, outputs = {}, {}
        chosen = {name: IMPLEMENTATIONS[name] for name in args.implementations}
        for name, fn in chosen.items():
            run(fn, emb, ids, index, options)  # warm-up
            best = None
            for _ in range(args.repeat):
                loss, grads, fwd, bwd = run(fn, emb, ids, index, options)
                best = (fwd, bwd) if best is None or fwd + bwd < sum(best) else best
            times[name], outputs[name] = best, (loss, *grads)
        both = len(chosen) == 2
        cell = lambda name, i: f"{times[name][i]:.2f}" if name in times else "-"  # noqa: E731
        ratio = f"{sum(times['previous']) / sum(times['current']):.2f}" if both else "-"
        diff = f"{max(rel_diff(a, b) for a, b in zip(outputs['current'], outputs['previous'])):.1e}" if both else "-"
        row = (f"| {M} | {P} | {sim} | {threads} | {cell('previous', 0)} | {cell('previous', 1)} | "
               f"{cell('current', 0)} | {cell('current', 1)} | {ratio} | {diff} |")
        if args.memory:
            row += "".join(f" {peak_mib(fn, emb, ids, index, options):.0f} |" if name in chosen else " - |"
                           for name, fn in IMPLEMENTATIONS.items())
        print(row, flush=True)
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
