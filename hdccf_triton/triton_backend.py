"""The Triton backend: the fused kernels of ``hdccf_triton.kernels`` behind an autograd.Function.

Triton is imported lazily, so ``import hdccf_triton`` works where it is absent.
"""

from __future__ import annotations

import os

import torch

__all__ = ["unavailable_reason", "per_row_loss"]


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on tensors of ``device``, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the machine
        return f"Triton is not installed ({err}); install it with `pip install triton` (Linux only)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return (
            f"the tensors are on {device}, and the Triton kernels need CUDA tensors "
            "(set TRITON_INTERPRET=1 to run them, slowly, in Triton's CPU interpreter)"
        )
    if device.type == "cuda" and interpreted:
        return "TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only"
    return "the fused Triton kernels are not implemented yet"


def per_row_loss(inputs, interactions, options) -> torch.Tensor:
    raise NotImplementedError("the fused Triton kernels are not implemented yet")
