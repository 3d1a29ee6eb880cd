"""What the two Triton backends share, written once: whether Triton can run, loading the
kernels for the current ``TRITON_INTERPRET`` setting, the interaction index as the kernels
read it, the ids they read, work splits, and explicit launch overrides for tests and
benchmarks.

Triton is imported lazily (inside these functions), so ``import hdccf_triton`` works where it
is absent. The kernels are the package ``hdccf_triton.kernels`` (the top-level ``kernels/``
of a checkout, installed under that name; an editable install is the supported way to run a
checkout).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass, fields, replace
from types import SimpleNamespace
from typing import Callable

import torch

from ..interactions import InteractionIndex

__all__ = [
    "unavailable_reason", "interpreting", "load_kernels", "LaunchOverrides", "IndexLayout", "index_layout", "CallSetup",
    "kernel_ids", "check_row_offset", "split_size", "column_splits", "accumulation_dtype", "empty", "merge_splits",
    "merge_column_splits",
    "cdiv", "without_dynamo",
]


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backends cannot run on tensors of ``device``, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the machine
        return f"Triton is not installed ({err}); install it with `pip install triton` (Linux only)"
    if importlib.util.find_spec("hdccf_triton.kernels") is None:
        return ("the kernels package hdccf_triton.kernels is not installed: install the package "
                "(`pip install -e .` in a checkout); a checkout on PYTHONPATH lacks it, since its "
                "kernels/ folder lies beside hdccf_triton/")
    interpreted = interpreting()
    if device.type != "cuda" and not interpreted:
        return (
            f"the tensors are on {device}, and the Triton kernels need CUDA tensors "
            "(set TRITON_INTERPRET=1 to run them, slowly, in Triton's CPU interpreter)"
        )
    if device.type == "cuda" and interpreted:
        return "TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only"
    if device.type not in ("cuda", "cpu"):
        return f"the Triton interpreter runs on CPU tensors, got tensors on {device}"
    return None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1``: the kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: the kernel modules, in dependency order (a module imports helpers of those before it)
_KERNEL_MODULES = ("membership", "negative_mask", "negative_stats_fwd", "negative_stats_bwd", "modulated_fwd", "modulated_bwd")


def load_kernels() -> SimpleNamespace:
    """The kernel modules (``membership``, ``negative_mask``, ``negative_stats_fwd``, ``negative_stats_bwd``,
    ``modulated_fwd``, ``modulated_bwd``), decorated for the current ``TRITON_INTERPRET``.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when a module is executed; if the modules were
    loaded under the other setting (a GPU test, then an interpreter test in one process),
    they are reloaded in dependency order, so that each binds its helpers' current versions.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface

    from hdccf_triton.kernels import (
        membership, modulated_bwd, modulated_fwd, negative_mask, negative_stats_bwd, negative_stats_fwd,
    )

    modules = [membership, negative_mask, negative_stats_fwd, negative_stats_bwd, modulated_fwd,
               modulated_bwd]  # dependency order
    interpret = interpreting()
    decorated = [v for m in modules for v in vars(m).values() if isinstance(v, KernelInterface)]
    if any(isinstance(v, InterpretedFunction) != interpret for v in decorated):
        modules = [importlib.reload(m) for m in modules]
    return SimpleNamespace(**dict(zip(_KERNEL_MODULES, modules)))


@dataclass(frozen=True)
class LaunchOverrides:
    """Explicit launch choices that replace the heuristics, for tests and benchmarks; normal
    use never needs them. A field left at None keeps the backend's own choice.

    Attributes:
        block_m, block_n, num_warps: the tiles and warps of every kernel of a backend.
        col_splits: splits of the columns (forward, row-parallel backward).
        row_splits: splits of the rows (column-parallel backward).
        index_mode: how the kernels look up D: 1 the dense bitmap, 2 the sorted-keys search.
        poison_outputs: fill every output buffer with NaN (floats) or −2**31 (ints) before the
            kernels run, so that an element a kernel forgets to write cannot pass unnoticed.
        sm_count: choose the GPU launch configuration as for a GPU with this many SMs (on
            any device: to inspect or replay a GPU's launches on a CPU).
        mask_bits: True / False force the dot/cosine kernels' true-negative masks to be read
            from bits computed once per batch / gathered from D in every pass (the default
            chooses by memory: ``triton_dot.uses_mask_bits``).
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    col_splits: int | None = None
    row_splits: int | None = None
    index_mode: int | None = None
    poison_outputs: bool = False
    sm_count: int | None = None
    mask_bits: bool | None = None

    def apply(self, config, **names: str):
        """``config`` (a frozen dataclass) with the overrides set, each field renamed by
        ``names`` (``{override: config field}``) where they differ; fields it lacks are skipped."""
        own = {f.name for f in fields(config)}
        values = {}
        for f in ("block_m", "block_n", "num_warps", "col_splits", "row_splits"):
            value, target = getattr(self, f), names.get(f, f)
            if value is not None and target in own:
                values[target] = value
        return replace(config, **values) if values else config


NO_OVERRIDES = LaunchOverrides()


def sm_count(device: torch.device, overrides: LaunchOverrides) -> int | None:
    """The streaming multiprocessors whose launch configuration to use, or None (interpreter)."""
    if overrides.sm_count is not None:
        return overrides.sm_count
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


# ---------------------------------------------------------------------------------------------
# The interaction index and the ids as the kernels read them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexLayout:
    """D as the kernels' ``INDEX_MODE`` reads it (``kernels/membership.py``)."""

    mode: int  # 0 none, 1 dense bitmap, 2 sorted keys
    tensor: torch.Tensor  # the row bitmap (uint8, :meth:`InteractionIndex.row_bitmap`), the keys, or a placeholder never read
    n_keys: int
    num_items: int
    search_steps: int  # ceil(log2(n_keys + 1)) for the sorted search


def index_layout(
    interactions: InteractionIndex | None, debias: bool, device: torch.device, mode: int | None = None
) -> IndexLayout:
    """The layout of D for the kernels: none without debiasing or pairs, else the index's
    bitmap when it keeps one (:attr:`InteractionIndex.uses_bitmap`), else its sorted keys;
    ``mode`` forces 1 (bitmap) or 2 (search)."""
    if interactions is None or not debias or len(interactions) == 0:
        placeholder = torch.zeros(1, dtype=torch.int64, device=device)
        return IndexLayout(0, placeholder, 0, 1, 1)
    n = len(interactions)
    if mode is None:
        mode = 1 if interactions.uses_bitmap else 2
    if mode == 1:  # SEARCH_STEPS is unused: keep it fixed, so that |D| does not recompile
        return IndexLayout(1, interactions.row_bitmap(), n, interactions.num_items, 1)
    steps = max(1, n.bit_length())  # = ceil(log2(n + 1))
    return IndexLayout(2, interactions.keys.contiguous(), n, interactions.num_items, steps)


def kernel_ids(ids: tuple, interactions: InteractionIndex | None) -> tuple:
    """users, items ``[M]`` and the flattened pool ids ``[N·P]``, contiguous; int32 (fewer
    registers for the in-kernel flags) when the index bounds every id, else int64."""
    narrow = interactions is not None and max(interactions.num_users, interactions.num_items) <= 2**31
    id_dtype = torch.int32 if narrow else torch.int64
    return tuple(t.reshape(-1).to(id_dtype).contiguous() for t in ids)


@dataclass(frozen=True)
class CallSetup:
    """What the kernels of one call read besides the differentiable tensors: the part both
    Triton backends share (each extends it with its own fields)."""

    ids: tuple  # users [M], items [M], x_ids [NP], y_ids [NP]: int32 or int64, contiguous
    index: IndexLayout
    debias: bool
    temperature: float
    row_offset: int
    P: int
    poison: bool  # NaN-fill the output buffers first (LaunchOverrides.poison_outputs)

    @classmethod
    def of(cls, inputs, interactions: InteractionIndex | None, options, row_offset: int,
           overrides: LaunchOverrides, **extra):
        """The setup of one call on validated ``inputs`` (a LossInputs) under ``options``;
        ``extra``: the fields of a subclass."""
        M = inputs.user_emb.shape[0]
        N, P = inputs.pool_item_emb.shape[:2]
        return cls(
            ids=kernel_ids(inputs.ids, interactions),
            index=index_layout(interactions, options.debias, inputs.user_emb.device, overrides.index_mode),
            debias=options.debias,
            temperature=options.temperature,
            row_offset=check_row_offset(row_offset, M, N),
            P=P,
            poison=overrides.poison_outputs,
            **extra,
        )

    def index_args(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """The kernels' arguments after their operands: the four id vectors, D's layout
        (tensor, number of keys, num_items) and the scale constants ``[4]`` in ``dtype``:
        1/τ, log2(e)/τ, log2(e), ln 2 (the kernels' ``SCALE_*`` slots; computed here in
        float64, so that fp64 kernels get them exactly: a Python float inside a kernel is an
        fp32 constant)."""
        layout = self.index
        inv_tau = 1.0 / self.temperature
        scale = torch.tensor([inv_tau, math.log2(math.e) * inv_tau, math.log2(math.e), math.log(2.0)],
                             dtype=torch.float64).to(dtype=dtype, device=device)
        return (*self.ids, layout.tensor, layout.n_keys, layout.num_items, scale)


def check_row_offset(row_offset: int, M: int, N: int) -> int:
    """``row_offset`` as an int, when the M rows' own blocks lie inside the N pool blocks."""
    if not 0 <= row_offset <= N - M:
        raise ValueError(f"row_offset={row_offset} puts the rows' own blocks outside the {N} pool blocks")
    return int(row_offset)


# ---------------------------------------------------------------------------------------------
# Buffers and splits
# ---------------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_size(total: int, splits: int, block: int) -> tuple[int, int]:
    """(items per split, a multiple of ``block``; number of non-empty splits)."""
    blocks = cdiv(total, block)
    per = cdiv(blocks, max(1, min(splits, blocks))) * block
    return per, cdiv(total, per)


def column_splits(n_pool: int, n_extra: int, splits: int, block: int) -> tuple[int, int, int]:
    """The forward's column splits when B′ = ``n_extra`` mixed-negative columns follow the
    ``n_pool`` pool columns: ``(cols_per_split, pool_splits, splits)``. The pool columns are
    cut as :func:`split_size` cuts them, the extra columns in further splits of the same size,
    so that no split straddles n_pool (the kernels' ``column_split`` under ``EXTRA``) and the
    counts of the pool splits are those over the pool columns alone. Without extras:
    ``split_size`` of the pool."""
    per, pool_splits = split_size(n_pool, splits, block)
    return per, pool_splits, pool_splits + cdiv(n_extra, per)


def merge_column_splits(lse_parts: torch.Tensor, cnt_parts: torch.Tensor, pool_splits: int, *,
                        base2: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`merge_splits` of the splits of :func:`column_splits`, and the counts over the pool
    columns alone (the first ``pool_splits`` splits, summed in order), or None when every split
    is a pool split (no mixed negatives): ``(lse [k, M], counts [2, M], aux counts [2, M] | None)``."""
    lse, counts = merge_splits(lse_parts, cnt_parts, base2=base2)
    if pool_splits == cnt_parts.shape[0]:
        return lse, counts, None
    return lse, counts, cnt_parts[:pool_splits].to(torch.int64).sum(0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty(shape, dtype: torch.dtype, device: torch.device, poison: bool = False) -> torch.Tensor:
    """An output buffer; with ``poison`` filled with NaN (floats) or −2**31 (ints)."""
    if not poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = math.nan if dtype.is_floating_point else -(2**31)
    return torch.full(shape, fill, dtype=dtype, device=device)


def merge_splits(lse_parts: torch.Tensor, cnt_parts: torch.Tensor, *, base2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``[splits, k, M]`` log-sums and int32 counts of the column splits → ``[k, M]`` log-sums
    and int64 counts, merged in a fixed order: log Σ_s exp(lse_s) (−inf when all are −inf);
    ``base2``: the log-sums are base-2, log2 Σ_s 2^(lse_s) (merged in float64)."""
    if lse_parts.shape[0] == 1:
        return lse_parts[0], cnt_parts[0].to(torch.int64)
    if base2:
        ln2 = math.log(2.0)
        merged = (torch.logsumexp(lse_parts.double() * ln2, dim=0) / ln2).to(lse_parts.dtype)
        return merged, cnt_parts.to(torch.int64).sum(0)
    return torch.logsumexp(lse_parts, dim=0), cnt_parts.to(torch.int64).sum(0)


def without_dynamo(fn: Callable) -> Callable:
    """``fn`` behind ``torch.compiler.disable`` (under ``torch.compile``: a graph break around
    the kernel launches), wrapped on first call: ``torch.compiler.disable`` imports
    torch._dynamo, hence triton, and importing hdccf_triton must not."""
    wrapped: list = []

    def call(*args, **kwargs):
        if not wrapped:
            wrapped.append(torch.compiler.disable(fn))
        return wrapped[0](*args, **kwargs)

    call.__doc__, call.__name__, call.__wrapped__ = fn.__doc__, fn.__name__, fn
    return call
