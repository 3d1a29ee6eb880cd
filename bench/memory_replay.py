"""Peak memory of forward + backward, replayed on the CPU: an estimate for machines without a GPU.

    python bench/memory_replay.py                    # M = 4096, P = 4, d = 64 (the issue's target shape)
    python bench/memory_replay.py -M 1024 -P 1 --dtypes bf16

Not a GPU measurement (``bench/kernel_bench.py`` measures ``torch.cuda.max_memory_allocated`` on a
GPU, and that figure supersedes this one). What it does: runs forward + backward of each
backend on CPU tensors and tracks every tensor storage that aten ops create, from its creation
to its release (a ``TorchDispatchMode`` with a finaliser on each storage), and reports the
peak of the live bytes above the inputs, as ``max_memory_allocated`` minus the inputs would,
up to the CUDA caching allocator's 512-byte rounding. For the Triton backend the kernel
launches are stubbed out (their output buffers are still allocated, as on the GPU) and the
launch configuration is the one chosen for an H100 SXM (132 SMs, ``LaunchOverrides(sm_count=132)``);
the reference runs for real. The interaction index and its bitmap (read by both backends) are
built before the measurement, as the GPU benchmark's warm-up call does. Allocations inside one aten
kernel (workspaces) are not seen, for either backend.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPLAYED_SMS, LiveBytes, loss_fn, realistic_index  # noqa: E402
from kernel_bench import make_batch  # noqa: E402

from hdccf_triton import LossOptions  # noqa: E402
from hdccf_triton.backends import reference, triton_dot  # noqa: E402
from hdccf_triton.backends._triton_runtime import LaunchOverrides  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _NoLaunch:
    """``kernel[grid](*args)`` that does nothing."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_launches() -> None:
    """Triton backend on CPU tensors: no kernel runs. The one monkeypatch of this script:
    ``triton_dot`` loads its kernels through the name ``load_kernels`` it imported from
    ``_triton_runtime``; replaced there, every ``kernels.<module>.<kernel>[grid](...)`` is a
    no-op, while the backend still allocates every buffer it would on the GPU. (The H100
    launch configuration is chosen explicitly, by ``LaunchOverrides(sm_count=...)``.)"""
    triton_dot.load_kernels = _NoLaunch


def peak_extra_mib(per_row_loss, M, P, d, dtype, similarity, index, **kwargs) -> float:
    """MiB at the peak of forward + backward, above the inputs; ``kwargs`` go to ``per_row_loss``."""
    embeddings, ids = make_batch(M, P, d, dtype, index, torch.device("cpu"))
    leaves = [e.detach().clone().requires_grad_() for e in embeddings]
    options = LossOptions(similarity=similarity, omega_user=0.05, omega_item=0.05, temperature=0.2)
    forward = loss_fn(per_row_loss, leaves, ids, index, options, **kwargs)
    probe = LiveBytes(preexisting=[*leaves, *ids])
    with probe:
        loss = forward()
        grads = torch.autograd.grad(loss.sum(), leaves)
        del loss, grads
    return probe.peak / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-M", type=int, default=4096)
    parser.add_argument("-P", type=int, default=4)
    parser.add_argument("-d", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--similarities", nargs="+", choices=["dot", "cosine"], default=["dot", "cosine"])
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    args = parser.parse_args(argv)

    stub_triton_launches()
    index = realistic_index(torch.device("cpu"))
    index.bitmap()  # built once and kept: the lookup table of the reference ...
    index.row_bitmap()  # ... and of the Triton kernels (else the first call measured would build it)
    print(f"CPU allocation replay (not a GPU measurement), M={args.M} P={args.P} d={args.d}, "
          f"Triton launches as on {REPLAYED_SMS} SMs")
    # "triton": the default (the masks as bits, when they fit); "gathered": every pass gathers its masks
    print("| dtype | similarity | triton MiB | triton, masks gathered, MiB | reference MiB | triton / reference "
          "| gathered / reference |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        for similarity in args.similarities:
            shape = (args.M, args.P, args.d, DTYPES[name], similarity, index)
            tri = peak_extra_mib(triton_dot.per_row_loss, *shape, overrides=LaunchOverrides(sm_count=REPLAYED_SMS))
            gathered = peak_extra_mib(triton_dot.per_row_loss, *shape,
                                      overrides=LaunchOverrides(sm_count=REPLAYED_SMS, mask_bits=False))
            ref = float("nan")
            if not args.no_reference:
                ref = peak_extra_mib(reference.per_row_loss, *shape)
            ratio = lambda v: f"1/{ref / v:.1f}" if ref == ref else "-"  # noqa: E731
            print(f"| {name} | {similarity} | {tri:.2f} | {gathered:.2f} | {ref:.1f} | {ratio(tri)} | {ratio(gathered)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
