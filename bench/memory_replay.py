"""Peak memory of forward + backward, replayed on the CPU: an estimate for machines without a GPU.

    python bench/memory_replay.py                    # M = 4096, P = 4, d = 64 (the issue's target shape)
    python bench/memory_replay.py -M 1024 -P 1 --dtypes bf16

Not a GPU measurement (``bench/kernels.py`` measures ``torch.cuda.max_memory_allocated`` on a
GPU, and that figure supersedes this one). What it does: runs forward + backward of each
backend on CPU tensors and tracks every tensor storage that aten ops create, from its creation
to its release (a ``TorchDispatchMode`` with a finaliser on each storage), and reports the
peak of the live bytes above the inputs, as ``max_memory_allocated`` minus the inputs would,
up to the CUDA caching allocator's 512-byte rounding. For the Triton backend the kernel
launches are stubbed out (their output buffers are still allocated, as on the GPU) and the
launch configuration is the one chosen for an H100 SXM (132 SMs); the reference runs for real.
The interaction index (and the reference's dense lookup table, the Triton bitmap) is built
before the measurement, as the GPU benchmark's warm-up call does. Allocations inside one aten
kernel (workspaces) are not seen, for either backend.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import LiveBytes, realistic_index  # noqa: E402
from kernels import make_batch  # noqa: E402

from hdccf_triton import LossOptions, reference, triton_backend  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: the streaming multiprocessors of the GPU whose launch configuration is replayed (H100 SXM)
REPLAYED_SMS = 132


class _NoLaunch:
    """``kernel[grid](*args)`` that does nothing."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_launches() -> None:
    """Triton backend on CPU tensors: no kernel runs, the H100 launch configuration is used."""
    stub = _NoLaunch()
    triton_backend._kernels = lambda: types.SimpleNamespace(fwd=stub, bwd=stub, membership=stub)
    triton_backend._interpreting = lambda: False
    props = types.SimpleNamespace(multi_processor_count=REPLAYED_SMS)
    torch.cuda.get_device_properties = lambda device=None: props
    config = triton_backend.launch_config
    triton_backend.launch_config = lambda M, NP, d, device, dtype=None: config(M, NP, d, torch.device("cuda"), dtype)


def peak_extra_mib(backend, M, P, d, dtype, similarity, index) -> float:
    """MiB at the peak of forward + backward, above the inputs."""
    embeddings, ids = make_batch(M, P, d, dtype, index, torch.device("cpu"))
    leaves = [e.detach().clone().requires_grad_() for e in embeddings]
    options = LossOptions(similarity=similarity, omega_user=0.05, omega_item=0.05, temperature=0.2)
    probe = LiveBytes(preexisting=[*leaves, *ids])
    with probe:
        loss = backend.per_row_loss(*leaves, *ids, index, options, 0)
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
    index.contains(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))  # its lookup table
    triton_backend.interaction_bitmap(index)
    print(f"CPU allocation replay (not a GPU measurement), M={args.M} P={args.P} d={args.d}, "
          f"Triton launches as on {REPLAYED_SMS} SMs")
    print("| dtype | similarity | triton MiB | reference MiB | triton / reference |")
    print("|---|---|---|---|---|")
    for name in args.dtypes:
        for similarity in args.similarities:
            tri = peak_extra_mib(triton_backend, args.M, args.P, args.d, DTYPES[name], similarity, index)
            ref = float("nan")
            if not args.no_reference:
                ref = peak_extra_mib(reference, args.M, args.P, args.d, DTYPES[name], similarity, index)
            ratio = f"1/{ref / tri:.1f}" if ref == ref else "-"
            print(f"| {name} | {similarity} | {tri:.2f} | {ref:.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
