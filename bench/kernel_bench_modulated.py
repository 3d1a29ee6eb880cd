"""Benchmark of the modulated-similarity kernels against the PyTorch reference, eager and compiled.

For M in {512, 1024, 4096}, P = 4, d = 64 (the size of p and of e; inputs are [.., 2·64]),
fp32, it measures the forward and the forward + backward of the per-row loss with a
``ModulatedSimilarity`` (gradients to the four embedding tensors and to g's weight and bias):
median and 20/80 % quantiles (``triton.testing.do_bench``, or 3 timed runs for calls over
0.25 s) and the peak memory above the inputs (``torch.cuda.max_memory_allocated``). A backend
that runs out of memory is reported as OOM. Results go to ``bench/results/`` as
``kernels_modulated.csv`` and ``kernels_modulated.md``.

    python bench/kernel_bench_modulated.py                 # GPU: the grid above
    python bench/kernel_bench_modulated.py --dry-run       # CPU: Triton interpreter, tiny shapes
    python bench/kernel_bench_modulated.py --compile-only  # no GPU: compile the three kernels for
                                                           # sm_90 at the launch tiles, print the
                                                           # registers, spills and shared memory

Work per pair (k, j) and family (A or B), d = 64: the kernels form e_r⊙e_c (d), W₃(e_r⊙e_c)
(2d² flops), the sigmoid and f (≈ 6d); the reference does the same with [rows, N·P, d]
tensors in memory-bound passes. torch.compile (mode default, dynamic=False) unrolls the
reference's Python loop over row chunks, so it is compiled for the smallest M only by default
(``--compile-m``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from harness import (
    REPLAYED_SMS, compile_and_report, compile_baseline, loss_fn, measure_passes, realistic_index,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

GRID = dict(M=(512, 1024, 4096), P=(4,), d=(64,))
DRY = dict(M=(16, 24), P=(2,), d=(8,))
FIELDS = ["device", "M", "P", "d", "normalize", "backend", "pass", "median_ms", "p20_ms",
          "p80_ms", "extra_mib", "status"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    mode.add_argument("--compile-only", action="store_true", help="compile for --arch, print resources")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only")
    p.add_argument("--d", type=int, default=64, help="d for --compile-only")
    p.add_argument("--normalize", action="store_true", help="cosine of the modulated vectors")
    p.add_argument("--compile-m", type=int, nargs="*", default=None,
                   help="the M for which torch.compile is measured (default: the smallest)")
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds after which the baselines are skipped")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are loaded
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.compile_only:
        return compile_only(args.arch, args.d, args.normalize)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/kernel_bench_modulated.py needs a CUDA GPU (use --dry-run on a CPU)")
        return 2
    grid = DRY if args.dry_run else GRID
    compile_m = set(args.compile_m if args.compile_m is not None else [min(grid["M"])])
    rows = run_grid(grid, compile_m, args, dry_run=args.dry_run)
    write_outputs(rows, args.out)
    return 0


def run_grid(grid, compile_m, args, *, dry_run):
    import torch

    from hdccf_triton import ModulatedSimilarity
    from hdccf_triton.backends import reference, triton_modulated
    from hdccf_triton.options import LossOptions

    device = torch.device("cpu" if dry_run else "cuda")
    name = "CPU (Triton interpreter)" if dry_run else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    index = realistic_index(device, small=dry_run)
    rows = []
    for M in grid["M"]:
        for P in grid["P"]:
            for d in grid["d"]:
                torch.manual_seed(0)
                sim = ModulatedSimilarity(d, args.normalize).to(device)
                options = LossOptions(temperature=0.1, omega_user=0.1, omega_item=0.1, similarity=sim)
                batch = _batch(M, P, d, index, device)
                backends = {"triton": triton_modulated.per_row_loss, "torch": reference.per_row_loss}
                if M in compile_m:
                    backends["torch.compile"] = compile_baseline(reference.per_row_loss, dry_run)
                for backend, fn in backends.items():
                    skip = None
                    if backend != "triton" and time.perf_counter() - start > args.budget:
                        skip = "skipped: time budget"
                    base = dict(device=name, M=M, P=P, d=d, normalize=args.normalize, backend=backend)
                    for row in measure(fn, base, batch, index, options, sim, device, skip):
                        rows.append(row)
                        print(_line(row), flush=True)
                del batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def _batch(M, P, d, index, device, *, seed=0, scale=0.3):
    """Embeddings [.., 2·d] = [vector ‖ factor], N(0, scale²), and uniform ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = lambda *s: (torch.randn(*s, 2 * d, generator=g) * scale).to(device)  # noqa: E731
    ids = lambda n, *s: torch.randint(0, n, s, generator=g).to(device)  # noqa: E731
    U, I = index.num_users, index.num_items
    return [emb(M), emb(M), emb(M, P), emb(M, P)], [ids(U, M), ids(I, M), ids(I, M, P), ids(U, M, P)]


def measure(fn, base, batch, index, options, sim, device, skip):
    """Rows of fwd and fwd+bwd for one backend and shape."""
    import torch

    embeddings, ids = batch
    leaves = [e.detach().clone().requires_grad_() for e in embeddings]
    params = list(sim.parameters())
    forward = loss_fn(fn, leaves, ids, index, options)

    def forward_backward():
        torch.autograd.grad(forward().sum(), leaves + params)

    return measure_passes(base, forward, forward_backward, device, skip)


def _line(row) -> str:
    head = f"M={row['M']:<5} P={row['P']} d={row['d']} {row['backend']:<13} {row['pass']:<7}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}"
    mem = f" {row['extra_mib']:9.1f} MiB" if row.get("extra_mib") is not None else ""
    return f"{head} {row['median_ms']:10.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]{mem}"


def write_outputs(rows, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels_modulated.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else "" if v is None else v)
                             for k, v in ((k, row.get(k)) for k in FIELDS)})
    (out / "kernels_modulated.md").write_text(markdown(rows))
    print(f"wrote {out / 'kernels_modulated.csv'} and {out / 'kernels_modulated.md'}")


def markdown(rows) -> str:
    device = rows[0]["device"] if rows else "?"
    lines = [f"# Modulated similarity: fused Triton kernels vs the PyTorch reference on {device}", "",
             "fp32, τ = 0.1, ω = 0.1, debiased; gradients to the embeddings and to g's weight and bias.", "",
             "| M | P | d | normalize | backend | pass | median ms | [20 %, 80 %] | extra MiB | speed-up vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["M"], r["P"], r["d"], r["pass"]): r.get("median_ms")
             for r in rows if r["backend"] == "torch" and r.get("status") == "ok"}
    for r in rows:
        key = (r["M"], r["P"], r["d"], r["pass"])
        if r.get("status") != "ok":
            cells = [r.get("status", "?"), "", "", ""]
        else:
            mem = f"{r['extra_mib']:.1f}" if r.get("extra_mib") is not None else "n/a"
            speed = f"{eager[key] / r['median_ms']:.2f}x" if eager.get(key) else ""
            cells = [f"{r['median_ms']:.3f}", f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]", mem, speed]
        lines.append("| " + " | ".join(map(str, [r["M"], r["P"], r["d"], r["normalize"], r["backend"],
                                                  r["pass"], *cells])) + " |")
    return "\n".join(lines) + "\n"


def compile_only(arch: int, d: int, normalize: bool) -> int:
    """Compile the three modulated kernels for ``sm_<arch>`` exactly as their launches at
    M = 4096, P = 4 compile them (the H100 launch configuration; ``bench/sass_report.py``
    intercepts the launches of the real host code on CPU tensors and binds and specializes
    them as the JIT does) and print what ptxas reports: registers, stack (spills), shared
    memory. Needs no GPU."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    import sass_report
    from hdccf_triton.backends._triton_runtime import LaunchOverrides
    from hdccf_triton.backends import triton_modulated
    from hdccf_triton.options import LossOptions
    from hdccf_triton.similarity import ModulatedSimilarity

    index = sass_report._index()
    torch.manual_seed(0)
    options = LossOptions(temperature=0.1, omega_user=0.1, omega_item=0.1,
                          similarity=ModulatedSimilarity(d, normalize))
    leaves, ids = sass_report._batch(4096, 4, 2 * d, torch.float32, index)
    with sass_report.capture_launches(arch) as (launches, target):
        sass_report._run_backend(triton_modulated.per_row_loss, leaves, ids, index, options,
                                 overrides=LaunchOverrides(sm_count=REPLAYED_SMS))
    print(f"target sm_{arch}; triton {triton.__version__}; d={d}, normalize={normalize}, M=4096, P=4")
    status = 0
    for launch in launches:
        k = launch.constexprs
        head = (f"{launch.name:<34} tile={k.get('BLOCK_M')}x{k.get('BLOCK_N')} block_d={k.get('BLOCK_D')} "
                f"warps={launch.options['num_warps']}")
        status |= compile_and_report(launch.src, GPUTarget("cuda", arch, 32), launch.options, head)
    return status


if __name__ == "__main__":
    sys.exit(main())
