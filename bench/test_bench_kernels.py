"""CPU microbenchmarks of the loss backends (pytest-benchmark); not part of ``tests/``.

    python -m pytest bench/test_bench_kernels.py --benchmark-enable -q

The reference backend runs at a moderate shape; the Triton kernels run in Triton's CPU
interpreter at a tiny shape, as a smoke check of the whole path (the interpreter is orders of
magnitude slower than a GPU: its timings mean nothing). The last test dry-runs
``bench/kernel_bench.py`` (the GPU benchmark) to check its CSV, Markdown and plot outputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hdccf_triton.backends import reference
from hdccf_triton.options import LossOptions

HERE = Path(__file__).resolve().parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("kernel_bench", HERE / "kernel_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench_module()
OPTIONS = LossOptions(temperature=0.1, omega_user=0.1, omega_item=0.1)


def _fwd_bwd(per_row_loss, M, P, d, index):
    embeddings, ids = bench.make_batch(M, P, d, torch.float32, index, torch.device("cpu"))
    leaves = [e.requires_grad_() for e in embeddings]
    forward = bench.loss_fn(per_row_loss, leaves, ids, index, OPTIONS)

    def run():
        return torch.autograd.grad(forward().sum(), leaves)

    return run


def test_reference_forward_backward(benchmark):
    index = bench.realistic_index(torch.device("cpu"))  # ML-1M sized
    run = _fwd_bwd(reference.per_row_loss, 512, 4, 64, index)
    grads = benchmark(run)
    assert all(torch.isfinite(g).all() for g in grads)


def test_triton_interpreter_smoke(benchmark, monkeypatch):
    pytest.importorskip("triton")
    from hdccf_triton.backends import triton_dot

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the runtime reloads the kernels for it
    index = bench.realistic_index(torch.device("cpu"), small=True)
    run = _fwd_bwd(triton_dot.per_row_loss, 16, 2, 8, index)
    grads = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    want = _fwd_bwd(reference.per_row_loss, 16, 2, 8, index)()
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_gpu_benchmark_dry_run(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--dry-run", "--no-compile", "--out", str(tmp_path)]) == 0
    csv_text = (tmp_path / "kernels.csv").read_text()
    assert csv_text.startswith("gpu,dtype,M,P,d,backend,pass,median_ms")
    assert csv_text.count("\n") == 1 + 4 * 2 * 2  # header + shapes × backends × passes
    md = (tmp_path / "kernels.md").read_text()
    assert "| triton | fwd+bwd |" in md and "speed-up vs eager reference" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "kernels.png").stat().st_size > 10_000
