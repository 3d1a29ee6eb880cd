"""Forward and backward of the PyTorch reference at a large batch on the CPU (issue 2).

    python bench/reference_large.py                  # M=8192, P=4, d=64, float32
    python bench/reference_large.py -M 4096 --dtype float64

Prints the loss, forward and backward wall time and the process's peak RSS. The interaction
index is 1,000,000 random pairs over ML-1M's 6,040 users x 3,416 items.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from hdccf_triton import InteractionIndex, debiased_contrastive_loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-M", type=int, default=8192)
    p.add_argument("-P", type=int, default=4)
    p.add_argument("-d", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    nu, ni, M, P, d = 6040, 3416, args.M, args.P, args.d
    index = InteractionIndex.from_pairs(torch.randint(0, nu, (1_000_000,), generator=g),
                                        torch.randint(0, ni, (1_000_000,), generator=g), nu, ni)
    emb = [(torch.randn(*s, generator=g, dtype=dtype) * 0.1).requires_grad_()
           for s in [(M, d), (M, d), (M, P, d), (M, P, d)]]
    ids = [torch.randint(0, nu, (M,), generator=g), torch.randint(0, ni, (M,), generator=g),
           torch.randint(0, ni, (M, P), generator=g), torch.randint(0, nu, (M, P), generator=g)]
    t0 = time.perf_counter()
    loss = debiased_contrastive_loss(*emb, *ids, interactions=index, omega_user=0.1, omega_item=0.1,
                                     backend="torch")
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"M={M} P={P} d={d} {args.dtype} {torch.get_num_threads()} threads: loss {loss.item():.6f}, "
          f"forward {t1 - t0:.1f} s, backward {t2 - t1:.1f} s, peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
