"""Static work report of the fused kernels, read from the SASS Triton generates for sm_90.

No GPU is needed: the backends run their real launch path on CPU tensors
(``LaunchOverrides(sm_count=132)``, the H100/H200 launch configuration), and every kernel launch
is intercepted (``JITFunction.run``) instead of executed. The interceptor binds the arguments
exactly as the JIT does at a launch (Triton's own ``create_function_from_signature`` binder and
``JITFunction._pack_args``: the same constexprs, the same specialization of pointers and
integers divisible by 16 or equal to 1, the same options ``num_warps``, ``num_stages``,
``maxnreg``), builds the same ``ASTSource(fn, signature, constexprs, attrs)`` and compiles it
for ``GPUTarget("cuda", 90, 32)``. The cubin is disassembled with the ``cuobjdump`` shipped with
Triton (``triton/backends/nvidia/bin``).

    python bench/sass_report.py                       # full grid -> bench/results/sass_report.{csv,md}
    python bench/sass_report.py --quick               # bf16, dot, d = 64, M = 4096 only
    python bench/sass_report.py --quick --tiles 128,32,8 --out /tmp/r   # A/B: other tiles, all three kernels
    python bench/sass_report.py --quick --gather --out /tmp/r      # A/B: the masks gathered in every pass
    python bench/sass_report.py --quick --d 128 --dtype float32 --sim cosine --M 1024 --P 2
    python3 bench/sass_report.py --precompile --jobs 8     # on the GPU machine: compile the kernels
                                                           # bench/kernel_bench.py --quick launches,
                                                           # in parallel, into Triton's cache

**Everything here is a static estimate from generated code, not a measurement.** When
``bench/results/sass_report_before.csv`` exists (the same report on the kernels before issue
17's changes), the Markdown ends with a before → after table. Not modelled: memory and L1
throughput (the bitmap gathers are random 1-byte loads), latencies and stalls (the issue
rate assumes a full scheduler every cycle), occupancy beyond "one program per SM".

How the sweep loop is found in SASS: a loop is a backward branch (``BRA`` to a lower address);
its body is the address range [target, branch]. The sweep over the score tiles is the
outermost loop that holds the most ``MUFU`` instructions, then the most instructions (the
backward row pass also has a loop over the P own columns, the modulated kernels have inner
loops over the embedding dim). Per iteration of the sweep, the body of an inner loop counts
ceil(d / CHUNK) times, the modulated kernels' steps over d (``kernels/modulated_fwd.py``; those
loops run over a runtime d and ptxas leaves them rolled: :func:`loop_work`). Code that ptxas moves out of line
(after ``EXIT``) is not counted.

Counts are warp instructions per loop iteration; "per pair" is thread instructions per (row,
column) pair: ``count · 32 · num_warps / (BLOCK_M · BLOCK_N)`` (each tile iteration covers
BLOCK_M × BLOCK_N pairs; each of the four score matrices A, B, C, E is one element of a pair).

Speed-of-light model (assumptions, H100 SXM and H200: same SM count and clocks; cited from
NVIDIA's H100 data sheet and the CUDA C++ Programming Guide, "Arithmetic Instructions"
throughput table for compute capability 9.0):

* 132 SMs at 1.83 GHz (the clock at which 132 SMs · 4096 dense bf16 flop/clk = 989 TFLOP/s);
* issue: 4 warp instructions per clock per SM (one per scheduler), no stalls;
* MUFU (ex2, lg2, rcp): 16 results per clock per SM;
* tensor cores: 989 TFLOP/s dense bf16; IEEE fp32 products run on the FMA units:
  128 FMA per clock per SM (61.8 TFLOP/s at 1.83 GHz).

Work per pair (N = M blocks of P columns, pairs = M · N·P): 20 products of length d (forward
4, each backward pass 8: 4 recomputed scores and 4 gradient products) and 12 exponentials (4
per pass). Floor = max(tensor-core or FMA time, MUFU time). Issue-bound estimate per pass =
per-pair instructions · pairs / 32 / (4 · clock · active SMs), active SMs = min(132, programs
of the captured launch grid).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LABEL = "static estimate from generated code, not a measurement"

#: the GPU whose launch configuration is replayed (H100 / H200 SXM: 132 SMs)
N_SM = 132
CLOCK_HZ = 1.83e9
ISSUE_PER_CLK = 4  # warp instructions per clock per SM
MUFU_PER_CLK = 16  # results per clock per SM
FMA_PER_CLK = 128  # fp32 FMA results per clock per SM
TC_FLOPS = {"bfloat16": 989e12, "float32": N_SM * FMA_PER_CLK * 2 * CLOCK_HZ}
GPUS = ("H100 SXM", "H200")  # the same compute rates (they differ in memory bandwidth only)
PRODUCTS_PER_PAIR = 20
EXPS_PER_PAIR = 12
#: the modulated kernels' d × d products a pair, in units of d² FMAs (A and B: 2 a product): the
#: forward's W₃(e_r ⊙ e_c) (2), the row pass's recomputation and δ_kᵀe_c (4), the column pass's
#: recomputation and δW₃ (4)
MODULATED_FMAS_PER_PAIR = 10

GRID = dict(M=(4096, 16384), P=(4,), d=(64, 128), dtype=("bfloat16", "float32"), sim=("dot", "cosine"))
QUICK = dict(M=(4096,), P=(4,), d=(64,), dtype=("bfloat16",), sim=("dot",))
#: the modulated kernels at their default shape (bench/kernel_bench_modulated.py): fp32, d = 64
MODULATED = dict(M=4096, P=4, d=64)

TC_OPS = ("HGMMA", "WGMMA", "HMMA", "IMMA", "DMMA")
INT_OPS = ("IMAD", "IADD", "IADD3", "LOP3", "LOP", "SHF", "ISETP", "LEA", "IMNMX", "SEL", "PRMT", "ISCADD",
           "I2F", "F2I", "IABS", "POPC", "FLO", "BMSK", "SGXT", "VIADD", "VIMNMX", "ISUB")


# ---------------------------------------------------------------------------------------------
# Intercepting launches
# ---------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One intercepted kernel launch: what the JIT would compile, and the grid."""

    name: str
    grid: tuple
    src: object  # triton.compiler.ASTSource
    options: dict
    key: tuple
    constexprs: dict
    attrs: dict


@contextlib.contextmanager
def capture_launches(arch: int = 90):
    """Within the block, ``kernel[grid](...)`` records a :class:`Launch` instead of running:
    the arguments are bound and specialized by Triton's own launch code for ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton import knobs
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    launches: list[Launch] = []
    binders = {}
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        # as JITFunction.run: the same defaults, binder and _pack_args, another target
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        src = ASTSource(self, signature, constexprs, attrs)
        if callable(grid):
            grid = grid(bound_args)
        opts = dict(options.__dict__)
        key = (self.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               repr(sorted(attrs.items(), key=str)), repr(sorted(opts.items(), key=str)))
        launches.append(Launch(self.__name__, tuple(grid), src, opts, key,
                               {self.arg_names[k[0]]: v for k, v in constexprs.items()}, attrs))
        return None

    JITFunction.run = run
    try:
        yield launches, target
    finally:
        JITFunction.run = original


# ---------------------------------------------------------------------------------------------
# The launches of the backends at a shape (their real host code, on CPU tensors)
# ---------------------------------------------------------------------------------------------


def _index():
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import realistic_index  # noqa: E402

    import torch

    return realistic_index(torch.device("cpu"))


def dot_launches(M, P, d, dtype_name, sim, index, arch=90, tiles=None, mask_bits=None):
    """The launches of the dot/cosine backend's forward and backward at (M, P, d); ``tiles``
    (block_m, block_n, num_warps) overrides the launch heuristic's tiles of all three kernels,
    ``mask_bits`` (True / False) whether the masks are read from bits or gathered."""
    import torch

    from hdccf_triton.backends import triton_dot
    from hdccf_triton.backends._triton_runtime import LaunchOverrides
    from hdccf_triton.options import LossOptions

    options = LossOptions(temperature=0.1, omega_user=0.1, omega_item=0.1, similarity=sim)
    leaves, ids = _batch(M, P, d, getattr(torch, dtype_name), index)
    extra = dict(zip(("block_m", "block_n", "num_warps"), tiles)) if tiles else {}
    with capture_launches(arch) as (launches, _):
        _run_backend(triton_dot.per_row_loss, leaves, ids, index, options,
                     overrides=LaunchOverrides(sm_count=N_SM, mask_bits=mask_bits, **extra))
    return launches


def modulated_launches(M, P, d, index, arch=90):
    """The launches of the modulated backend (fp32, inputs [.., 2·d]) at (M, P, d)."""
    import torch

    from hdccf_triton.backends import triton_modulated
    from hdccf_triton.backends._triton_runtime import LaunchOverrides
    from hdccf_triton.options import LossOptions
    from hdccf_triton.similarity import ModulatedSimilarity

    torch.manual_seed(0)
    sim = ModulatedSimilarity(d)  # g's weights: never read (the kernels do not run)
    options = LossOptions(temperature=0.1, omega_user=0.1, omega_item=0.1, similarity=sim)
    leaves, ids = _batch(M, P, 2 * d, torch.float32, index)
    with capture_launches(arch) as (launches, _):
        _run_backend(triton_modulated.per_row_loss, leaves, ids, index, options,
                     overrides=LaunchOverrides(sm_count=N_SM))
    return launches


def _batch(M, P, width, dtype, index):
    import torch

    g = torch.Generator().manual_seed(0)
    emb = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype).requires_grad_()  # noqa: E731
    ids = lambda n, *s: torch.randint(0, n, s, generator=g)  # noqa: E731
    leaves = [emb(M, width), emb(M, width), emb(M, P, width), emb(M, P, width)]
    return leaves, [ids(index.num_users, M), ids(index.num_items, M), ids(index.num_items, M, P),
                    ids(index.num_users, M, P)]


def _run_backend(per_row_loss, leaves, ids, index, options, **kwargs):
    """Forward and backward through a backend's public path; the kernels do not run (their
    outputs hold whatever ``torch.empty`` gave), only their launches are recorded."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from harness import loss_fn  # noqa: E402

    loss = loss_fn(per_row_loss, leaves, ids, index, options, **kwargs)()
    params = list(leaves) + [q for q in options.similarity.parameters() if q.requires_grad]
    torch.autograd.grad(loss.sum(), params, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# Compiling and reading the SASS
# ---------------------------------------------------------------------------------------------


def _bin(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def tools_missing() -> str | None:
    """Why the report cannot run here (no triton, no cuobjdump/ptxas), or None."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    for tool in ("ptxas", "cuobjdump"):
        if not _bin(tool).exists():
            return f"{_bin(tool)} is missing"
    return None


@dataclass
class Compiled:
    sass: str
    regs: int
    stack: int
    local: int
    shared: int
    seconds: float


_COMPILED: dict = {}


def compile_launch(launch: Launch, target) -> Compiled:
    """Compile a launch as the JIT would (cached per launch key) and disassemble it."""
    if launch.key in _COMPILED:
        return _COMPILED[launch.key]
    import triton

    t = time.perf_counter()
    c = triton.compile(launch.src, target=target, options=launch.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_bin("cuobjdump")), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(_bin("cuobjdump")), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    out = Compiled(sass, int(res.get("REG", 0)), int(res.get("STACK", 0)), int(res.get("LOCAL", 0)),
                   int(c.metadata.shared), time.perf_counter() - t)
    _COMPILED[launch.key] = out
    return out


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of each instruction."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def loops(ins) -> list[tuple[int, int]]:
    """Backward branches: (target, branch address) of each loop."""
    out = []
    for addr, op, rest in ins:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) <= addr:
                out.append((int(t.group(1), 16), addr))
    return out


def sweep_loop(ins):
    """The sweep over the score tiles: the outermost loop with the most exponentials (``MUFU``)
    and, among equals, the most instructions (the row pass's loop over its P own columns,
    after the sweep, may hold more instructions than the sweep itself; the bits' kernel has
    no exponential and one loop)."""
    ls = loops(ins)
    if not ls:
        return None, []
    outer = [l for l in ls if not any(o != l and o[0] <= l[0] and l[1] <= o[1] for o in ls)]
    size = lambda l: sum(l[0] <= a <= l[1] for a, _, _ in ins)  # noqa: E731
    mufu = lambda l: sum(l[0] <= a <= l[1] and op.startswith("MUFU") for a, op, _ in ins)  # noqa: E731
    best = max(outer, key=lambda l: (mufu(l), size(l)))
    inner = [l for l in ls if l != best and best[0] <= l[0] and l[1] <= best[1]]
    return best, inner


def loop_work(ins, inner_trip: float = 1.0) -> dict:
    """Dynamic instruction counts of one iteration of the sweep loop, by class.

    Instructions of an inner loop (modulated kernels: the loops over the embedding dim,
    ``range(0, D, CHUNK)`` with a runtime D, which ptxas leaves rolled: one pass of the body
    does one chunk of CHUNK factor entries, 512 FFMAs per thread in the forward's product on a
    16 × 16 pair tile at d = 64 with 256 threads) count ``inner_trip`` times, the number of
    iterations (ceil(d / CHUNK) for the modulated kernels)."""
    best, inner = sweep_loop(ins)
    if best is None:
        return {}
    # the innermost loops only (nesting deeper than 2 does not occur here)
    innermost = [l for l in inner if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in inner)]
    weights = {}
    for lo, hi in innermost:
        for a, _, _ in ins:
            if lo <= a <= hi:
                weights[a] = inner_trip
    counts = dict(total=0.0, mufu=0.0, ex2=0.0, tc=0.0, ldg=0.0, lds=0.0, sts=0.0, spill=0.0, int=0.0,
                  shfl=0.0, redux=0.0, wait=0.0, static=0)
    for a, op, _ in ins:
        if not (best[0] <= a <= best[1]):
            continue
        w = weights.get(a, 1.0)
        base = op.split(".")[0]
        counts["static"] += 1
        if base == "NOP":
            continue
        counts["total"] += w
        if base == "MUFU":
            counts["mufu"] += w
            counts["ex2"] += w * (".EX2" in op)
        counts["tc"] += w * (base in TC_OPS)
        counts["ldg"] += w * (base in ("LDG", "LDGSTS"))
        counts["lds"] += w * (base in ("LDS", "LDSM"))
        counts["sts"] += w * (base in ("STS", "STSM"))
        counts["spill"] += w * (base in ("LDL", "STL"))
        counts["int"] += w * (base in INT_OPS)
        counts["shfl"] += w * (base == "SHFL")
        counts["redux"] += w * (base == "REDUX")
        counts["wait"] += w * (base in ("WARPGROUP", "WARPSYNC") or op.startswith("WARPGROUP.DEPBAR"))
    return counts


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

_PASS = {"true_negative_bits_kernel": "mask", "negative_stats_fwd_kernel": "fwd", "negative_stats_bwd_rows_kernel": "rows",
         "negative_stats_bwd_cols_kernel": "cols", "own_scores_kernel": "own",
         "modulated_stats_fwd_kernel": "fwd", "modulated_stats_bwd_rows_kernel": "rows",
         "modulated_stats_bwd_cols_kernel": "cols"}

#: the passes over the (row, column) pairs: the masks' bits (once per batch, when used), the
#: forward, the row pass and the column pass
SWEEPS = ("mask", "fwd", "rows", "cols")

FIELDS = ["family", "dtype", "sim", "M", "P", "d", "pass", "kernel", "block_m", "block_n", "warps", "stages",
          "programs", "loop_instr", "instr_per_pair", "mufu_per_pair", "ex2_per_pair", "tc_per_iter",
          "ldg_per_iter", "lds_per_iter", "int_per_pair", "shfl_per_iter", "redux_per_iter",
          "spills_loop", "spills_total", "regs", "stack", "smem", "issue_ms", "note"]


def kernel_rows(family, M, P, d, dtype, sim, launches, target, inner_trip) -> list[dict]:
    rows = []
    for launch in launches:
        c = compile_launch(launch, target)
        ins = parse_sass(c.sass)
        work = loop_work(ins, inner_trip)
        k = launch.constexprs
        bm = int(k.get("BLOCK_M", 0))
        # the bits' kernel: BLOCK_W words of 32 columns per tile
        bn = int(k.get("BLOCK_N", 0)) or 32 * int(k.get("BLOCK_W", 0))
        warps = int(launch.options["num_warps"])
        programs = 1
        for g in launch.grid:
            programs *= int(g)
        scale = 32 * warps / (bm * bn) if bm and bn and work else 0.0
        per_pair = work.get("total", 0.0) * scale
        row = dict(family=family, dtype=dtype, sim=sim, M=M, P=P, d=d, kernel=launch.name,
                   **{"pass": _PASS.get(launch.name, launch.name)},
                   block_m=bm, block_n=bn, warps=warps, stages=launch.options.get("num_stages"), programs=programs,
                   loop_instr=work.get("total", 0.0), instr_per_pair=per_pair,
                   mufu_per_pair=work.get("mufu", 0.0) * scale, ex2_per_pair=work.get("ex2", 0.0) * scale,
                   tc_per_iter=work.get("tc", 0.0), ldg_per_iter=work.get("ldg", 0.0), lds_per_iter=work.get("lds", 0.0),
                   int_per_pair=work.get("int", 0.0) * scale, shfl_per_iter=work.get("shfl", 0.0),
                   redux_per_iter=work.get("redux", 0.0), spills_loop=work.get("spill", 0.0),
                   spills_total=sum(op.split(".")[0] in ("LDL", "STL") for _, op, _ in ins),
                   regs=c.regs, stack=c.stack, smem=c.shared, note="")
        if row["pass"] in SWEEPS and per_pair:
            pairs = M * M * P
            active = min(N_SM, programs)
            row["issue_ms"] = per_pair * pairs / 32 / (ISSUE_PER_CLK * CLOCK_HZ * active) * 1e3
        elif row["pass"] == "own":
            row["note"] = "no sweep loop (O(M·P·d) work)"
        rows.append(row)
    return rows


def total_row(rows, family, M, P, d, dtype, sim) -> dict:
    """fwd+bwd: the issue-bound estimate (sum of the passes) against the floor."""
    pairs = M * M * P
    tc = PRODUCTS_PER_PAIR * 2 * d * pairs / TC_FLOPS["bfloat16" if dtype == "bfloat16" else "float32"] * 1e3
    mufu = EXPS_PER_PAIR * pairs / (N_SM * MUFU_PER_CLK * CLOCK_HZ) * 1e3
    issue = sum(r.get("issue_ms") or 0.0 for r in rows if r["pass"] in SWEEPS)
    per_pair = sum(r["instr_per_pair"] for r in rows if r["pass"] in SWEEPS)
    note = f"floor {max(tc, mufu):.3f} ms = max(products {tc:.3f} ms, MUFU {mufu:.3f} ms)"
    if family == "modulated":  # fp32 FMA units: the pairwise products with W₃ dominate
        fma = MODULATED_FMAS_PER_PAIR * d * d * pairs / (N_SM * FMA_PER_CLK * CLOCK_HZ) * 1e3
        note = f"floor {fma:.3f} ms = FMA time of {MODULATED_FMAS_PER_PAIR}·d² FMAs a pair"
    return dict(family=family, dtype=dtype, sim=sim, M=M, P=P, d=d, kernel="all", **{"pass": "fwd+bwd"},
                instr_per_pair=per_pair, issue_ms=issue, note=note,
                mufu_per_pair=sum(r["mufu_per_pair"] for r in rows if r["pass"] in SWEEPS),
                spills_loop=sum(r["spills_loop"] for r in rows))


def build(grid: dict, modulated: bool, quiet=False, tiles=None, mask_bits=None) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    # every module the launches read, imported (and their kernels decorated) up front
    from hdccf_triton.backends import _triton_runtime, triton_dot, triton_modulated  # noqa: F401

    _triton_runtime.load_kernels()
    index = _index()
    out = []
    target = None
    for dtype in grid["dtype"]:
        for sim in grid["sim"]:
            for d in grid["d"]:
                for M in grid["M"]:
                    for P in grid["P"]:
                        t = time.perf_counter()
                        launches = dot_launches(M, P, d, dtype, sim, index, tiles=tiles, mask_bits=mask_bits)
                        from triton.backends.compiler import GPUTarget

                        target = GPUTarget("cuda", 90, 32)
                        rows = kernel_rows("dot", M, P, d, dtype, sim, launches, target, 1.0)
                        rows.append(total_row(rows, "dot", M, P, d, dtype, sim))
                        out += rows
                        if not quiet:
                            for r in rows:
                                print(_line(r), flush=True)
                            print(f"  ({time.perf_counter() - t:.1f} s)", flush=True)
    if modulated:
        from triton.backends.compiler import GPUTarget

        target = GPUTarget("cuda", 90, 32)
        M, P, d = MODULATED["M"], MODULATED["P"], MODULATED["d"]
        launches = modulated_launches(M, P, d, index)
        # the inner loops step over d in chunks of CHUNK factor entries (modulated_fwd.py)
        from hdccf_triton.backends._triton_runtime import load_kernels

        trip = -(-d // load_kernels().modulated_fwd.CHUNK.value)
        rows = kernel_rows("modulated", M, P, d, "float32", "modulated", launches, target, float(trip))
        rows.append(total_row(rows, "modulated", M, P, d, "float32", "modulated"))
        out += rows
        if not quiet:
            for r in rows:
                print(_line(r), flush=True)
    return out


def _line(r) -> str:
    return (f"{r['family']:<9} {r['dtype']:<8} {r['sim']:<9} M={r['M']:<6} d={r['d']:<4} {r['pass']:<7} "
            f"tile={r.get('block_m', '')}x{r.get('block_n', '')} w={r.get('warps', '')} prog={r.get('programs', '')} "
            f"instr/pair={_f(r.get('instr_per_pair'))} mufu/pair={_f(r.get('mufu_per_pair'))} "
            f"spills(loop/all)={_f(r.get('spills_loop'))}/{r.get('spills_total', '')} regs={r.get('regs', '')} "
            f"issue={_f(r.get('issue_ms'), 3)} ms {r.get('note', '')}")


def _f(v, digits=1):
    if v is None or v == "":
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def read_csv(path: Path) -> list[dict]:
    """Rows of a report CSV, numbers as floats."""
    def num(v):
        try:
            return float(v)
        except ValueError:
            return v
    with open(path, newline="") as f:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def compare(before: list[dict], after: list[dict]) -> list[str]:
    """Markdown lines: before → after per kernel (the M = 4096 rows) and the estimate."""
    key = lambda r: (r["family"], r["dtype"], r["sim"], int(r["d"]), r["pass"])  # noqa: E731
    old = {key(r): r for r in before if int(r["M"]) == 4096}
    lines = ["## Before → after (M = 4096, P = 4; same report on the kernels before this change)", "",
             "| family | dtype | sim | d | pass | tile | instr/pair | MUFU/pair | spills in loop | regs "
             "| issue-bound ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in after:
        if int(r["M"]) != 4096 or r["pass"] == "own" or key(r) not in old:
            continue
        b = old[key(r)]

        def arrow(f, digits=1):
            x, y = b.get(f), r.get(f)
            if x in ("", None) or y in ("", None):
                return ""
            return f"{float(x):.{digits}f} → {float(y):.{digits}f}"

        tile = "" if r["pass"] == "fwd+bwd" else \
            f"{int(b['block_m'])}x{int(b['block_n'])}w{int(b['warps'])} → {int(r['block_m'])}x{int(r['block_n'])}w{int(r['warps'])}"
        regs = "" if r["pass"] == "fwd+bwd" else f"{int(b['regs'])} → {int(r['regs'])}"
        lines.append("| " + " | ".join(map(str, [
            r["family"], r["dtype"], r["sim"], int(r["d"]), r["pass"], tile, arrow("instr_per_pair"),
            arrow("mufu_per_pair"), arrow("spills_loop", 0), regs, arrow("issue_ms", 3)])) + " |")
    return lines + [""]


def write(rows, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in FIELDS})
    text = markdown(rows)
    before = out / "sass_report_before.csv"
    if name != "sass_report_before" and before.exists():
        # the CSV just written, read back: the same number formats on both sides
        text += "\n" + "\n".join(compare(read_csv(before), read_csv(out / f"{name}.csv")))
    (out / f"{name}.md").write_text(text)
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.md')}")


def markdown(rows) -> str:
    import triton

    lines = [f"# Static work report of the fused kernels (sm_90, Triton {triton.__version__})", "",
             f"**{LABEL}.** Compiled exactly as the launches at each shape compile them (the H100/H200 launch "
             "configuration, 132 SMs), disassembled with cuobjdump; see `bench/sass_report.py` for how the loop "
             "is found and for the hardware rates assumed (132 SMs, 1.83 GHz, 4 issues/clk/SM, 16 MUFU/clk/SM, "
             "989 TFLOP/s bf16 tensor cores, 128 FMA/clk/SM for IEEE fp32). Per pair: thread instructions per "
             "(row, column) pair of one loop iteration (one pair covers the four scores A, B, C, E). "
             "Spills: spill instructions (STL/LDL) in one iteration of the loop (inner loops counted d "
             "times) / in the whole kernel (static).", "",
             "## Kernels (sweep loop)", "",
             "| family | dtype | sim | d | pass | tile | warps | instr/pair | MUFU/pair | int/pair | TC/iter "
             "| LDG/iter | LDS/iter | SHFL/iter | spills loop/all | regs | smem B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if r["pass"] == "fwd+bwd":
            continue
        key = (r["family"], r["dtype"], r["sim"], r["d"], r["pass"])
        if key in seen:
            continue
        seen.add(key)
        lines.append("| " + " | ".join(map(str, [
            r["family"], r["dtype"], r["sim"], r["d"], r["pass"], f"{r['block_m']}x{r['block_n']}", r["warps"],
            _f(r["instr_per_pair"]), _f(r["mufu_per_pair"]), _f(r["int_per_pair"]), _f(r["tc_per_iter"], 0),
            _f(r["ldg_per_iter"], 0), _f(r["lds_per_iter"], 0), _f(r["shfl_per_iter"], 0),
            f"{_f(r['spills_loop'], 0)}/{r['spills_total']}", r["regs"], r["smem"]])) + " |")
    lines += ["", "## Speed-of-light model, P = 4 (static estimate, H100 SXM = H200 for these rates)", "",
              "| family | dtype | sim | M | d | programs mask/fwd/rows/cols | instr/pair mask/fwd/rows/cols | "
              "issue-bound fwd+bwd ms | floor |",
              "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["family"], r["dtype"], r["sim"], r["M"], r["d"]), []).append(r)
    for (fam, dt, sim, M, d), rs in groups.items():
        by = {r["pass"]: r for r in rs}
        tot = by.get("fwd+bwd", {})
        progs = "/".join(str(by[p]["programs"]) if p in by else "-" for p in SWEEPS)
        ipp = "/".join(_f(by[p]["instr_per_pair"]) if p in by else "-" for p in SWEEPS)
        lines.append(f"| {fam} | {dt} | {sim} | {M} | {d} | {progs} | {ipp} | {_f(tot.get('issue_ms'), 3)} "
                     f"| {tot.get('note', '')} |")
    return "\n".join(lines) + "\n"


def readme_table(before: list[dict], after: list[dict], M: int = 4096) -> str:
    """The results log's table (examples/results/README.md): per configuration at ``M`` rows,
    instructions per pair of the passes (the masks' bits, where used, then the three sweeps), MUFU
    per pair, spill instructions in the loops and the issue-bound estimate, before → after, beside
    the floor. Made from the committed CSVs (no compilation)."""
    def index(rows):
        out = {}
        for r in rows:
            if r["M"] == M and r["pass"] in (*SWEEPS, "fwd+bwd"):
                out.setdefault((r["family"], r["dtype"], r["sim"], int(r["d"])), {})[r["pass"]] = r
        return out

    was, now = index(before), index(after)
    lines = ["| kernels | dtype | d | instr/pair mask / fwd / rows / cols | MUFU/pair fwd+bwd | spill instr. in loops | "
             "issue-bound fwd+bwd, ms | floor, ms |", "|---|---|---|---|---|---|---|---|"]
    for key, by in now.items():
        family, dtype, sim, d = key
        old = was.get(key, {})
        ipp = lambda rows: " / ".join(_f(rows[p]["instr_per_pair"]) if p in rows else "-"  # noqa: E731
                                      for p in SWEEPS)
        tot, old_tot = by.get("fwd+bwd", {}), old.get("fwd+bwd", {})
        floor = tot.get("note", "").split(" ms")[0].replace("floor ", "")
        lines.append(f"| {sim} | {dtype} | {d} | {ipp(old)} → {ipp(by)} | {_f(old_tot.get('mufu_per_pair'))} → "
                     f"{_f(tot.get('mufu_per_pair'))} | {_f(old_tot.get('spills_loop'), 0)} → "
                     f"{_f(tot.get('spills_loop'), 0)} | {_f(old_tot.get('issue_ms'), 3)} → "
                     f"{_f(tot.get('issue_ms'), 3)} | {floor} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Parallel pre-compilation (the GPU scripts): warm Triton's cache before the benchmark runs
# ---------------------------------------------------------------------------------------------

#: what ``bench/kernel_bench.py --quick`` launches: (M, P, d, dtype, sim, tiles), tiles None
#: for the heuristic; the A/B tiles at the target shape, and "gather" (its gathered masks)
def bench_quick_configs():
    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_bench  # noqa: E402

    q = kernel_bench.QUICK
    out = [(M, P, d, t, "dot", None) for M in q["M"] for P in q["P"] for d in q["d"] for t in q["dtype"]]
    M, P, d, t = kernel_bench.TARGET
    out += [(M, P, d, t, "dot", tile) for tile in (*kernel_bench.AB_TILES, "gather")]
    return out


def _precompile_one(config):
    """Worker: capture one configuration's launches and compile them for this machine's GPU
    (or sm_90 without one) into Triton's on-disk cache, where the JIT finds them at launch."""
    os.environ.pop("TRITON_INTERPRET", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    torch.set_num_threads(1)
    M, P, d, dtype, sim, tiles = config
    global N_SM
    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
        N_SM = torch.cuda.get_device_properties(0).multi_processor_count
    from hdccf_triton.backends import _triton_runtime

    _triton_runtime.load_kernels()
    t = time.perf_counter()
    gather = tiles == "gather"
    launches = dot_launches(M, P, d, dtype, sim, _index(), arch=arch, tiles=None if gather else tiles,
                            mask_bits=False if gather else None)
    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for launch in launches:
        if launch.key not in seen:
            seen.add(launch.key)
            triton.compile(launch.src, target=target, options=launch.options)
    return f"{config}: {len(seen)} kernels in {time.perf_counter() - t:.1f} s"


def precompile(jobs: int) -> int:
    import concurrent.futures
    import multiprocessing

    configs = bench_quick_configs()
    t = time.perf_counter()
    status = 0
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for config, fut in [(c, pool.submit(_precompile_one, c)) for c in configs]:
            try:
                print(fut.result(), flush=True)
            except Exception as err:  # noqa: BLE001 - the benchmark compiles what is missing itself
                print(f"{config}: FAILED {err!r}"[:400], flush=True)
                status = 1
    print(f"precompiled {len(configs)} configurations in {time.perf_counter() - t:.1f} s")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="bf16, dot, d = 64, M = 4096 only")
    p.add_argument("--no-modulated", action="store_true", help="skip the modulated kernels")
    p.add_argument("--d", type=int, nargs="*", default=None, help="the embedding dims (default 64 128; quick 64)")
    p.add_argument("--dtype", nargs="*", default=None, help="bfloat16 and/or float32 (default both; quick bf16)")
    p.add_argument("--sim", nargs="*", default=None, help="dot and/or cosine (default both; quick dot)")
    p.add_argument("--M", type=int, nargs="*", default=None, help="rows (default 4096 16384; quick 4096)")
    p.add_argument("--P", type=int, nargs="*", default=None, help="pool entries a row (default 4)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="sass_report", help="output file stem (default sass_report)")
    p.add_argument("--tiles", default=None, help="BM,BN,WARPS: override the tiles of the three dot kernels "
                   "(A/B exploration; the default is the launch heuristic)")
    p.add_argument("--gather", action="store_true",
                   help="the masks gathered from D in every pass (A/B: the default reads them from bits)")
    p.add_argument("--precompile", action="store_true",
                   help="compile what bench/kernel_bench.py --quick launches, in parallel, into Triton's cache")
    p.add_argument("--jobs", type=int, default=4, help="processes for --precompile")
    p.add_argument("--readme", action="store_true",
                   help="print the results log's table from the committed CSVs (sass_report_before.csv, sass_report.csv)")
    args = p.parse_args(argv)
    if args.readme:
        print(readme_table(read_csv(args.out / "sass_report_before.csv"), read_csv(args.out / "sass_report.csv")),
              end="")
        return 0
    tiles = tuple(int(v) for v in args.tiles.split(",")) if args.tiles else None
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    reason = tools_missing()
    if reason:
        print(f"bench/sass_report.py cannot run: {reason}")
        return 2
    if args.precompile:
        return precompile(args.jobs)
    grid = QUICK if args.quick else GRID
    if args.d:
        grid = dict(grid, d=tuple(args.d))
    if args.dtype:
        grid = dict(grid, dtype=tuple(args.dtype))
    if args.M:
        grid = dict(grid, M=tuple(args.M))
    if args.P:
        grid = dict(grid, P=tuple(args.P))
    if args.sim:
        grid = dict(grid, sim=tuple(args.sim))
    rows = build(grid, modulated=not (args.quick or args.no_modulated), tiles=tiles,
                 mask_bits=False if args.gather else None)
    write(rows, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
