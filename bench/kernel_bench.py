"""Benchmark of the fused Triton kernels against the PyTorch reference, eager and compiled.

For each shape (M rows, P pool entries a row, embedding dim d, dtype) and backend it measures
the forward and the forward + backward of the per-row loss (``triton.testing.do_bench``:
median and 20/80 % quantiles), the peak memory above the inputs
(``torch.cuda.max_memory_allocated``), and the achieved TFLOP/s of the products each backend
executes, beside the GPU's peak. Results go to ``bench/results/`` as CSV, Markdown and a PNG
plot (matplotlib, if installed).

    python bench/kernel_bench.py                 # full grid, under 4 minutes on one H100
    python bench/kernel_bench.py --quick         # M in {1024, 4096}, P = 4, d = 64
    python bench/kernel_bench.py --dry-run       # CPU: Triton interpreter, tiny shapes, all outputs
    python bench/kernel_bench.py --compile-only  # no GPU needed: compile the kernels for sm_90 and
                                                 # print registers, spills and shared memory

Work counted (a product is 2·M·N·P·d flops, N = M): the Triton forward does 4 products
(A, B, C, E), its backward 16 (the row pass and the column pass each recompute the 4 score
tiles and do 4 gradient products). The reference does 4 forward and 8 backward products, plus
4 more when it checkpoints its row chunks (it recomputes their forward).

The interaction index is ML-1M sized (6,040 users × 3,416 items, 1M random pairs); the loss
is the debiased one with dot similarity, τ = 0.1, ω_u = ω_i = 0.1. torch.compile (mode
default, dynamic=False) compiles once per shape and only for a few shapes (its warm-up takes
tens of seconds each); a backend that runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from harness import (
    compile_and_report, compile_baseline, loss_fn, measure_passes, realistic_index,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

FULL = dict(M=(1024, 4096, 16384), P=(1, 4), d=(64, 128), dtype=("float32", "bfloat16"))
QUICK = dict(M=(1024, 4096), P=(4,), d=(64,), dtype=("float32", "bfloat16"))
DRY = dict(M=(16, 32), P=(1, 2), d=(8,), dtype=("float32",))
#: shapes (M, P, d, dtype) whose torch.compile baseline is measured (warm-up ~30-90 s each)
COMPILE_FULL = {(4096, 4, 64, "bfloat16"), (4096, 4, 64, "float32"), (1024, 4, 64, "bfloat16")}
COMPILE_QUICK = {(4096, 4, 64, "bfloat16")}
TARGET = (4096, 4, 64, "bfloat16")  # the shape of the performance targets
#: A/B rows at the target shape: the Triton backend with these tiles (block_m, block_n, num_warps)
#: forced on all three kernels, beside the launch heuristic's own choice ("triton"); the
#: backend is then labelled ``triton[BMxBNwW]``. bench/sass_report.py estimates the same statically.
AB_TILES = ((64, 16, 4), (128, 32, 8), (128, 64, 8))
#: and the A/B row of the masks gathered from D in every pass instead of read from the batch's
#: bits (``LaunchOverrides(mask_bits=False)``, the launch heuristic's tiles)
AB_GATHER = "triton[gather]"
DRY_TARGET = (32, 2, 8, "float32")  # stands in for it in --dry-run
#: the block_d whose GPU tiles --compile-only compiles (those triton_dot tunes, 64 to 256)
COMPILE_BLOCK_D = (64, 128, 256)

#: dense peak TFLOP/s (tensor cores for bf16/fp16; plain FP32 for fp32, which runs IEEE)
PEAKS = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 51.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float32": 91.6},
}

FIELDS = ["gpu", "dtype", "M", "P", "d", "backend", "pass", "median_ms", "p20_ms", "p80_ms",
          "tflops", "peak_tflops", "extra_mib", "status"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the target shapes only")
    mode.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    mode.add_argument("--compile-only", action="store_true", help="compile for --arch, print resources")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which slow baselines are skipped (default 200, quick 90)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are loaded
    elif "TRITON_INTERPRET" in os.environ and not args.compile_only:
        del os.environ["TRITON_INTERPRET"]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.compile_only:
        return compile_only(args.arch)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/kernel_bench.py needs a CUDA GPU (use --dry-run on a CPU, or --compile-only)")
        return 2
    grid = DRY if args.dry_run else QUICK if args.quick else FULL
    compile_shapes = set() if args.no_compile else (
        {(m, p, d, t) for m in DRY["M"] for p in DRY["P"] for d in DRY["d"] for t in DRY["dtype"]}
        if args.dry_run else COMPILE_QUICK if args.quick else COMPILE_FULL)
    budget = args.budget if args.budget is not None else (90.0 if args.quick else 200.0)
    target = DRY_TARGET if args.dry_run else TARGET
    # CSV and Markdown after every shape (a run cut short keeps its results); the plot at the end
    rows = run_grid(grid, compile_shapes, budget, dry_run=args.dry_run,
                    on_rows=lambda rows: write_tables(rows, args.out, target, quiet=True))
    write_outputs(rows, args.out, target)
    return 0


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def run_grid(grid: dict, compile_shapes: set, budget: float, *, dry_run: bool, on_rows=None) -> list[dict]:
    """Measure every shape of ``grid``: the Triton backend and the eager reference first, then
    the torch.compile baselines (slow warm-ups) of ``compile_shapes``. ``on_rows(rows)`` is
    called after each shape, so that a run cut short still leaves its results."""
    import torch

    from hdccf_triton.backends import reference, triton_dot
    from hdccf_triton.options import LossOptions

    device = torch.device("cpu" if dry_run else "cuda")
    gpu = "CPU (Triton interpreter)" if dry_run else torch.cuda.get_device_name(device)
    print(f"device: {gpu}; torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    index = realistic_index(device, small=dry_run)
    options = LossOptions(temperature=0.1, omega_user=0.1, omega_item=0.1, similarity="dot")
    shapes = [(M, P, d, t) for t in grid["dtype"] for M in grid["M"] for P in grid["P"] for d in grid["d"]]
    plan = [(shape, ("triton", "torch")) for shape in shapes]
    if not dry_run:  # A/B: other tiles at the target shape (bench/sass_report.py explains them)
        plan += [(shape, (AB_GATHER, *(_ab_name(t) for t in AB_TILES))) for shape in shapes if shape == TARGET]
    plan += [(shape, ("torch.compile",)) for shape in shapes if shape in compile_shapes]
    rows = []
    for shape, names in plan:
        M, P, d, dtype_name = shape
        batch = make_batch(M, P, d, getattr(torch, dtype_name), index, device)
        for name in names:
            elapsed = time.perf_counter() - start
            skip = None
            if name == "torch.compile" and elapsed > 0.6 * budget:
                skip = "skipped: time budget (compile warm-up)"
            elif name != "triton" and elapsed > budget:
                skip = "skipped: time budget"
            fn = {"triton": triton_dot.per_row_loss, "torch": reference.per_row_loss}.get(name)
            if name.startswith("triton["):  # an A/B row: gathered masks, or tiles forced on all three kernels
                fn = _ab_fn(triton_dot.per_row_loss, name)
            elif fn is None:  # compiled once per shape (dynamic=False), at its first call
                fn = compile_baseline(reference.per_row_loss, dry_run)
            for row in measure(fn, name, batch, index, options, shape, gpu, device, skip):
                rows.append(row)
                print(_line(row), flush=True)
        del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(rows)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def _ab_name(tile) -> str:
    return "triton[{}x{}w{}]".format(*tile)


def _ab_fn(per_row_loss, name):
    """``per_row_loss`` with the tiles of an A/B row name ``triton[BMxBNwW]`` forced, or with
    the masks gathered in every pass (:data:`AB_GATHER`)."""
    import functools
    import re

    from hdccf_triton.backends._triton_runtime import LaunchOverrides

    if name == AB_GATHER:
        return functools.partial(per_row_loss, overrides=LaunchOverrides(mask_bits=False))
    bm, bn, w = map(int, re.fullmatch(r"triton\[(\d+)x(\d+)w(\d+)\]", name).groups())
    return functools.partial(per_row_loss, overrides=LaunchOverrides(block_m=bm, block_n=bn, num_warps=w))


def make_batch(M, P, d, dtype, index, device, *, seed=0, scale=0.3):
    """Embeddings N(0, scale²) (scores ~ scale²·√d/τ ≈ 7 for d = 64) and uniform ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = lambda *s: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    ids = lambda n, *s: torch.randint(0, n, s, generator=g).to(device)  # noqa: E731
    U, I = index.num_users, index.num_items
    return ([emb(M, d), emb(M, d), emb(M, P, d), emb(M, P, d)],
            [ids(U, M), ids(I, M), ids(I, M, P), ids(U, M, P)])


def products(backend: str, M: int, P: int, d: int, what: str) -> float:
    """Flops executed: products × 2·M·N·P·d (see the module docstring)."""
    from hdccf_triton.backends import reference

    one = 2.0 * M * M * P * d
    if backend.startswith("triton"):
        return one * (4 if what == "fwd" else 20)
    checkpointed = max(1, reference.CHUNK_ELEMENTS // (M * P)) < M
    return one * (4 if what == "fwd" else 12 + (4 if checkpointed else 0))


def measure(fn, name, batch, index, options, shape, gpu, device, skip):
    """Rows of fwd and fwd+bwd for one backend and shape."""
    import torch

    M, P, d, dtype_name = shape
    embeddings, ids = batch
    peak = _peak(gpu, dtype_name)
    base = dict(gpu=gpu, dtype=dtype_name, M=M, P=P, d=d, backend=name, peak_tflops=peak)
    leaves = [e.detach().clone().requires_grad_() for e in embeddings]
    forward = loss_fn(fn, leaves, ids, index, options)

    def forward_backward():
        loss = forward()
        torch.autograd.grad(loss.sum(), leaves)

    return measure_passes(base, forward, forward_backward, device, skip, memory=("fwd+bwd",),
                          flops=lambda what: products(name, M, P, d, what))


def _peak(gpu: str, dtype_name: str):
    for key, peaks in PEAKS.items():  # "H100 PCIe" before "H100"
        if key in gpu:
            return peaks.get(dtype_name)
    return None


def _line(row) -> str:
    head = f"{row['dtype']:>8} M={row['M']:<6} P={row['P']:<2} d={row['d']:<4} {row['backend']:<13} {row['pass']:<7}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}"
    mem = f" {row['extra_mib']:9.1f} MiB" if row.get("extra_mib") is not None else ""
    spread = f"[{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]"
    return f"{head} {row['median_ms']:9.3f} ms  {spread}  {row['tflops']:7.2f} TFLOP/s{mem}"


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def write_outputs(rows: list[dict], out: Path, target=TARGET) -> None:
    write_tables(rows, out, target)
    plot(rows, out / "kernels.png")


def write_tables(rows: list[dict], out: Path, target=TARGET, *, quiet=False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})
    (out / "kernels.md").write_text(markdown(rows, target))
    if not quiet:
        print(f"wrote {out / 'kernels.csv'} and {out / 'kernels.md'}")


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else value


def markdown(rows: list[dict], target=TARGET) -> str:
    gpu = rows[0]["gpu"] if rows else "?"
    lines = [f"# Fused Triton kernels vs the PyTorch reference on {gpu}", ""]
    lines += _targets(rows, target) + [""]
    lines.append("| dtype | M | P | d | backend | pass | median ms | [20 %, 80 %] | TFLOP/s (peak) "
                 "| extra MiB | speed-up vs torch |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    eager = {(r["dtype"], r["M"], r["P"], r["d"], r["pass"]): r.get("median_ms")
             for r in rows if r["backend"] == "torch" and r.get("status") == "ok"}
    for r in rows:
        key = (r["dtype"], r["M"], r["P"], r["d"], r["pass"])
        if r.get("status") != "ok":
            cells = [r.get("status", "?"), "", "", "", ""]
        else:
            peak = f" ({r['peak_tflops']:.0f})" if r.get("peak_tflops") else ""
            mem = f"{r['extra_mib']:.1f}" if r.get("extra_mib") is not None else "n/a"
            speed = f"{eager[key] / r['median_ms']:.2f}x" if eager.get(key) else ""
            cells = [f"{r['median_ms']:.3f}", f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]",
                     f"{r['tflops']:.2f}{peak}", mem, speed]
        cells = [r["dtype"], r["M"], r["P"], r["d"], r["backend"], r["pass"], *cells]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _targets(rows, target) -> list[str]:
    """The performance targets at ``target`` (M = 4096, P = 4, d = 64, bf16), fwd+bwd."""
    M, P, d, dt = target
    pick = {r["backend"]: r for r in rows
            if (r["M"], r["P"], r["d"], r["dtype"], r["pass"]) == (M, P, d, dt, "fwd+bwd")}
    out = [f"Targets at M={M}, P={P}, d={d}, {dt}, forward + backward:", ""]
    tri = pick.get("triton")
    if not tri or tri.get("status") != "ok":
        return out + ["- not measured"]

    def ratio(name, want, what):
        base = pick.get(name)
        if not base or base.get("status") != "ok":
            return f"- {what}: baseline {base.get('status') if base else 'not measured'}"
        got = base["median_ms"] / tri["median_ms"]
        return f"- {what}: {got:.2f}x (target >= {want}x) {'PASS' if got >= want else 'FAIL'}"

    out.append(ratio("torch", 5, "speed-up vs eager reference"))
    out.append(ratio("torch.compile", 2, "speed-up vs torch.compile reference"))
    eager = pick.get("torch")
    if eager and eager.get("extra_mib") and tri.get("extra_mib") is not None:
        frac = tri["extra_mib"] / eager["extra_mib"]
        out.append(f"- peak extra memory: {tri['extra_mib']:.1f} MiB vs {eager['extra_mib']:.1f} MiB eager "
                   f"= 1/{1 / max(frac, 1e-9):.0f} (target <= 1/20) {'PASS' if frac <= 1 / 20 else 'FAIL'}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(dtypes)), figsize=(max(7, 6 * len(dtypes)), 5), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        series = {}
        for r in rows:
            if r["dtype"] == dt and r["pass"] == "fwd+bwd" and r.get("status") == "ok":
                series.setdefault((r["backend"], r["P"], r["d"]), []).append((r["M"], r["median_ms"]))
        for (backend, P, d), points in sorted(series.items()):
            points.sort()
            style = {"triton": "-o", "torch": "--s", "torch.compile": ":^"}.get(backend, "-")
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=f"{backend} P={P} d={d}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows; N·P = M·P pool columns)")
        ax.set_ylabel("forward + backward, median ms")
        ax.set_title(f"{dt}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    gpu = rows[0]["gpu"] if rows else ""
    fig.suptitle(f"HDCCF loss, forward + backward: fused Triton kernels vs PyTorch reference\n{gpu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed)
# ---------------------------------------------------------------------------------------------


def compile_only(arch: int) -> int:
    """Compile every kernel for ``sm_<arch>`` exactly as a launch compiles it and print the
    registers, stack (spills) and shared memory ptxas reports. Needs no GPU: the backend runs
    on CPU tensors with the launch configuration of an H100 (``LaunchOverrides(sm_count=...)``)
    and each launch is intercepted and compiled with the JIT's own binding and specialization
    (``bench/sass_report.py``: the same constexprs, the divisibility-by-16 hints of pointers
    and integers, the same options). ``bench/sass_report.py`` counts the work in the SASS."""
    import triton

    import sass_report

    index = sass_report._index()
    status = 0
    print(f"target sm_{arch}; triton {triton.__version__}; M=4096, P=4 (H100 launch configuration)")
    seen = set()
    for block_d in COMPILE_BLOCK_D:
        for dtype, sim in (("bfloat16", "dot"), ("bfloat16", "cosine"), ("float32", "dot"), ("float32", "cosine")):
            launches = sass_report.dot_launches(4096, 4, block_d, dtype, sim, index, arch=arch)
            from triton.backends.compiler import GPUTarget

            for launch in launches:
                if launch.key in seen:
                    continue
                seen.add(launch.key)
                k = launch.constexprs
                head = (f"{launch.name:<32} {dtype} {sim} block_d={k.get('BLOCK_D')} "
                        f"tile={k.get('BLOCK_M')}x{k.get('BLOCK_N', k.get('BLOCK_D'))} warps={launch.options['num_warps']}")
                status |= compile_and_report(launch.src, GPUTarget("cuda", arch, 32), launch.options, head)
    return status


if __name__ == "__main__":
    sys.exit(main())
