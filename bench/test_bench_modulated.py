"""CPU microbenchmarks of the modulated similarity (pytest-benchmark); not part of ``tests/``.

    python -m pytest bench/test_bench_modulated.py --benchmark-enable -q

The chunked PyTorch reference runs forward + backward at M = 128, P = 4, d = 64 (fp32, with
gradients to g's weight and bias too), once per chunk size, to show what the bound on the
[rows, M·P, d] modulation tensor costs; the Triton kernels run in the interpreter at a tiny
shape as a smoke check (interpreter timings mean nothing); the last test dry-runs
``bench/kernel_bench_modulated.py`` (the GPU benchmark) and checks its CSV and Markdown.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from hdccf_triton import ModulatedSimilarity
from hdccf_triton.backends import reference
from hdccf_triton.options import LossOptions

HERE = Path(__file__).resolve().parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("kernel_bench_modulated", HERE / "kernel_bench_modulated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench_module()


def _fwd_bwd(per_row_loss, M, P, d, index):
    torch.manual_seed(0)
    sim = ModulatedSimilarity(d)
    options = LossOptions(temperature=0.1, omega_user=0.1, omega_item=0.1, similarity=sim)
    embeddings, ids = bench._batch(M, P, d, index, torch.device("cpu"))
    leaves = [e.requires_grad_() for e in embeddings] + list(sim.parameters())
    forward = bench.loss_fn(per_row_loss, leaves[:4], ids, index, options)

    def run():
        return torch.autograd.grad(forward().sum(), leaves)

    return run


@pytest.mark.parametrize("chunk_elements", [1 << 20, 1 << 22, 1 << 24], ids=["1M", "4M", "16M"])
def test_reference_forward_backward(benchmark, chunk_elements):
    # M·P·pair_cost = 128·4·(2·64) = 64K entries a row: chunks of 16, 64 and 128 (= all, no
    # checkpoint) rows
    per_row_loss = functools.partial(reference.per_row_loss, chunk_elements=chunk_elements)
    index = bench.realistic_index(torch.device("cpu"), small=False)  # ML-1M sized
    grads = benchmark(_fwd_bwd(per_row_loss, 128, 4, 64, index))
    assert all(torch.isfinite(g).all() for g in grads)


def test_triton_interpreter_smoke(benchmark, monkeypatch):
    pytest.importorskip("triton")
    from hdccf_triton.backends import triton_modulated

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the runtime reloads the kernels for it
    index = bench.realistic_index(torch.device("cpu"), small=True)
    grads = benchmark.pedantic(_fwd_bwd(triton_modulated.per_row_loss, 16, 2, 8, index), rounds=1, iterations=1)
    assert all(torch.isfinite(g).all() for g in grads)


def test_gpu_benchmark_dry_run(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "kernels_modulated.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 shapes × (triton, torch) × 2 passes, plus torch.compile at the smallest M
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows), rows
    assert "| 16 | 2 | 8 | False | triton | fwd+bwd |" in (tmp_path / "kernels_modulated.md").read_text()
