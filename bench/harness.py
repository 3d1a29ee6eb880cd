"""What the GPU benchmarks share: the interaction index, the loss call, the timer, peak
memory, compilation.

Imported by ``bench/kernel_bench.py``, ``bench/kernel_bench_modulated.py`` and
``bench/memory_replay.py`` (run as scripts, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import time

#: the streaming multiprocessors of the GPU whose launch configuration is compiled
#: (``--compile-only``) or replayed (``memory_replay.py``) without a GPU: an H100 SXM
REPLAYED_SMS = 132


def realistic_index(device, *, small=False, seed=0):
    """An ML-1M-sized InteractionIndex: 6,040 users × 3,416 items, ~1M random pairs."""
    import torch

    from hdccf_triton import InteractionIndex

    num_users, num_items, pairs = (60, 40, 600) if small else (6040, 3416, 1_000_000)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, num_users * num_items, (pairs,), generator=g)
    index = InteractionIndex.from_pairs(keys // num_items, keys % num_items, num_users, num_items)
    return index.to(device)


def loss_fn(per_row_loss, leaves, ids, index, options, **kwargs):
    """``forward() -> [M]``: a backend's ``per_row_loss`` on the four embedding tensors
    ``leaves`` and the four id tensors ``ids``, with the similarity reduced first as the public
    API does (``reduce_similarity``: a no-op except for the all-ones modulation); ``kwargs``
    go to ``per_row_loss`` (``overrides=`` of the Triton backends, ``chunk_elements=`` of the
    reference)."""
    from hdccf_triton.terms import LossInputs, reduce_similarity

    def forward():
        inputs, reduced = reduce_similarity(LossInputs(*leaves, *ids), options)
        return per_row_loss(inputs, index, reduced, 0, **kwargs)

    return forward


def compile_baseline(fn, dry_run):
    """``torch.compile`` of a baseline; under ``--dry-run`` Dynamo tracing only (no C++ toolchain)."""
    import torch

    if dry_run:  # no C++ toolchain needed: Dynamo tracing only
        return torch.compile(fn, backend="eager", dynamic=False)
    return torch.compile(fn, mode="default", dynamic=False)


def bench(call, device):
    """(median, 20 %, 80 %) milliseconds. The first call warms up (compiles); a slow function
    (> 0.25 s) is timed over 3 runs; otherwise ``triton.testing.do_bench``."""
    import torch

    if device.type != "cuda":
        call()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1e3)
        return quantiles(times)
    call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    call()
    torch.cuda.synchronize()
    once = time.perf_counter() - t
    if once > 0.25:
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return quantiles(times)
    from triton.testing import do_bench

    median, p20, p80 = do_bench(call, warmup=10, rep=60, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def measure_passes(base: dict, forward, forward_backward, device, skip=None, *,
                   memory=("fwd", "fwd+bwd"), flops=None) -> list[dict]:
    """Rows of fwd and fwd+bwd of one backend and shape: ``base`` with the timings
    (:func:`bench`), the peak memory above the inputs of the passes in ``memory`` (on a GPU),
    the achieved TFLOP/s when ``flops(what)`` gives the flops of a pass, and a status: ok,
    OOM (the backward is then not tried), the error, or ``skip`` (nothing is run)."""
    import torch

    if skip:
        return [dict(base, **{"pass": w, "status": skip}) for w in ("fwd", "fwd+bwd")]
    out = []
    for what, call in (("fwd", forward), ("fwd+bwd", forward_backward)):
        row = dict(base, **{"pass": what})
        try:
            median, p20, p80 = bench(call, device)
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, status="ok")
            if flops is not None:
                row["tflops"] = flops(what) / (median * 1e-3) / 1e12
            if what in memory and device.type == "cuda":
                row["extra_mib"] = peak_extra_memory(call) / 2**20
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - report, keep benchmarking
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        out.append(row)
        if what == "fwd" and row["status"] == "OOM":  # the backward cannot fit either
            out.append(dict(base, **{"pass": "fwd+bwd", "status": "OOM"}))
            break
    return out


def quantiles(times):
    times = sorted(times)
    q = lambda f: times[min(len(times) - 1, int(round(f * (len(times) - 1))))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def peak_extra_memory(call) -> int:
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


class LiveBytes:
    """A ``TorchDispatchMode`` (made on first use: torch imports lazily here) that tracks the
    bytes of the tensor storages created under it, from creation to release, and their peak.

    ``preexisting`` tensors (the inputs) are never counted, nor are storages of ``ignore``
    dtypes (Triton's interpreter copies each kernel argument to the host as uint8).
    """

    def __new__(cls, preexisting=(), ignore=()):
        import weakref

        from torch.utils._pytree import tree_leaves
        from torch.utils._python_dispatch import TorchDispatchMode

        class _LiveBytes(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = 0
                self.peak = 0
                self._seen = {id(t.untyped_storage()) for t in preexisting}

            def _release(self, key, nbytes):
                self._seen.discard(key)
                self.live -= nbytes

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if not hasattr(t, "untyped_storage") or t.dtype in ignore:
                        continue
                    storage = t.untyped_storage()
                    key = id(storage)  # its Python object lives as long as the storage
                    if key in self._seen or storage.nbytes() == 0:
                        continue
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
                return out

        return _LiveBytes()


#: int32 pointers of every kernel here: ids, counts (the bitmap of D is read as bytes: "*u8")
_INT32_POINTERS = ("users", "items", "x_ids", "y_ids", "CNT")


def kernel_signature(fn, pointers: dict) -> dict:
    """Argument types of a kernel for ``triton.compile``: ``pointers`` maps argument names to
    their pointer type (``"*fp32"``, ``"*bf16"``), the ids and bitmap are ``*i32``, the other
    upper-case arguments constexpr (except the sizes M, NP, D, P), the rest i32."""
    types = {}
    for name in fn.arg_names:
        if name in pointers:
            types[name] = pointers[name]
        elif name == "index":
            types[name] = "*u8"
        elif name in _INT32_POINTERS:
            types[name] = "*i32"
        elif name.isupper() and name not in ("M", "NP", "D", "P"):
            types[name] = "constexpr"
        else:
            types[name] = "i32"
    return types


def spill_ops(sass: str) -> tuple[int, int]:
    """Local-memory loads/stores (register spills) in the SASS: (inside the sweep over the score
    tiles, the outermost loop with the most instructions, as ``bench/sass_report.py`` finds it;
    everywhere else). A loop is a backward branch."""
    import sass_report

    ins = sass_report.parse_sass(sass)
    best, _ = sass_report.sweep_loop(ins)
    ops = [a for a, op, _ in ins if op.split(".")[0] in ("LDL", "STL")]
    inside = sum(best[0] <= a <= best[1] for a in ops) if best else 0
    return inside, len(ops) - inside


def compile_and_report(src, target, options: dict, head: str) -> int:
    """Compile a kernel for ``target`` without a GPU and print its shared memory, registers,
    stack and local (spill) bytes (from the cuobjdump shipped with Triton, when present).

    Returns 0, or 1 when the compilation failed (reported, so every kernel gets its line)."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    t = time.perf_counter()
    try:
        c = triton.compile(src, target=target, options=options)
    except Exception as err:  # noqa: BLE001 - report every kernel
        print(f"{head} FAILED: {err!r}"[:600])
        return 1
    usage = ""
    if cuobjdump.exists() and "cubin" in c.asm:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                  capture_output=True, text=True).stdout
            sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True).stdout
        usage = " ".join(w for line in text.splitlines() if "REG" in line
                         for w in line.split() if w.split(":")[0] in ("REG", "STACK", "LOCAL"))
        usage += " spill-ops(main loop/elsewhere)={}/{}".format(*spill_ops(sass))
    print(f"{head} smem={c.metadata.shared} {usage} ({time.perf_counter() - t:.1f} s)", flush=True)
    return 0
