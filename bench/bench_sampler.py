"""Microbenchmark of the in-batch sampler: batches of M=1024, P=4 on an ML-1M-sized set.

Run with pytest-benchmark (the project's pytest config disables benchmarks by default):

    python -m pytest bench/bench_sampler.py --benchmark-enable -q

or directly, for a one-line figure:

    python bench/bench_sampler.py

The data is SASRec's ML-1M from ../shared/data when present (6,040 users, 3,416 items,
987,531 training pairs after the leave-one-out split), else a synthetic set of the same
size with power-law item popularity. Requirement (issue 5): >= 100 batches per second
on the 2-core CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hdccf_triton.sampling import InBatchSampler

M, P = 1024, 4
BATCHES_PER_ROUND = 100
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_ml1m(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """~990k unique pairs, 6,040 users x 3,416 items, Zipf-like item popularity.

    Each user draws its degree from a log-normal (mean ~165, as in ML-1M) and takes that
    many distinct items by Gumbel top-k over log-popularity weights.
    """
    num_users, num_items = 6040, 3416
    g = torch.Generator().manual_seed(seed)
    log_w = -0.8 * torch.log(torch.arange(1, num_items + 1, dtype=torch.float32))
    deg = torch.exp(4.6 + 0.9 * torch.randn(num_users, generator=g)).clamp(20, 2000).long()
    deg = (deg.double() * (987_531 / deg.sum())).long().clamp(20, num_items)
    gumbel = -torch.log(-torch.log(torch.rand(num_users, num_items, generator=g).clamp_min(1e-12)))
    order = torch.argsort(log_w + gumbel, dim=1, descending=True)
    take = torch.arange(num_items).unsqueeze(0) < deg.unsqueeze(1)
    users = torch.arange(num_users).unsqueeze(1).expand(-1, num_items)[take]
    return users.contiguous(), order[take].contiguous(), num_users, num_items


def ml1m_pairs() -> tuple[tuple[torch.Tensor, torch.Tensor, int, int], str]:
    """The real ML-1M training pairs when the shared copy is there, else synthetic ones."""
    if (SHARED / "ml-1m-sasrec" / "ml-1m.txt.gz").is_file():
        try:
            from hdccf_triton.data import load_dataset

            ds = load_dataset("ml-1m", SHARED, download=False)
            return (ds.train_users, ds.train_items, ds.num_users, ds.num_items), "ML-1M (SASRec copy)"
        except ImportError:  # polars missing: fall through to the synthetic set
            pass
    return synthetic_ml1m(), "synthetic ML-1M-sized"


@pytest.fixture(scope="module")
def sampler() -> InBatchSampler:
    (users, items, nu, ni), _ = ml1m_pairs()
    return InBatchSampler(users, items, nu, ni, batch_size=M, num_pool=P, seed=0)


def _endless(s: InBatchSampler):
    epoch = 0
    while True:
        yield from s.epoch_batches(epoch)
        epoch += 1


def test_bench_sampler_100_batches(benchmark, sampler):
    """One round = 100 batches of M=1024, P=4 (epoch permutations included)."""
    stream = _endless(sampler)

    def round_() -> torch.Tensor:
        for _ in range(BATCHES_PER_ROUND):
            batch = next(stream)
        return batch.pool_items

    out = benchmark(round_)
    assert out.shape[1] == P


def test_sampler_meets_100_batches_per_second(sampler):
    rate = batches_per_second(sampler)
    assert rate >= 100, f"{rate:.0f} batches/s"


def batches_per_second(s: InBatchSampler, n: int = 300) -> float:
    stream = _endless(s)
    next(stream)  # warm-up
    start = time.perf_counter()
    for _ in range(n):
        next(stream)
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    (users, items, nu, ni), what = ml1m_pairs()
    s = InBatchSampler(users, items, nu, ni, batch_size=M, num_pool=P, seed=0)
    print(f"{what}: {users.numel():,} training pairs, M={M}, P={P}, "
          f"{torch.get_num_threads()} threads: {batches_per_second(s, 1000):.0f} batches/s")
