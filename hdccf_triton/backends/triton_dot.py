"""The Triton backend of :class:`~hdccf_triton.similarity.Dot` and
:class:`~hdccf_triton.similarity.Cosine`: the fused kernels of ``kernels/negative_stats_fwd.py``
and ``kernels/negative_stats_bwd.py`` behind an autograd.Function.

:func:`fused_scores` computes in the kernels every score of the loss: the per-row log-sum-exps
over the true negatives (the one part that touches the M × N·P score matrices), the positive
scores s and the rows' own-block scores. Only the per-row combination
(:func:`~hdccf_triton.terms.combine_terms`, O(M·P) work) is the reference's, so the two
backends differ only in how the scores are computed. Nothing of shape [M, N·P], and no
temporary of shape [N, P, d] (but for the mixed negatives' concatenation, below), is ever
allocated: the forward keeps online max-shifted sums per
row, the backward recomputes the score tiles (flash-attention style) in a row-parallel pass
(dU, dI) and a column-parallel pass (dX, dY), without atomics, so gradients are bit-identical
run to run, and the gradients of s and of the own-block scores are added inside those passes.

Precision: the kernels read the embeddings in their own dtype (bf16/fp16 go to the tensor
cores as they are; fp32 uses IEEE fp32 products, never TF32; fp64 runs in fp64) and
accumulate in fp32 (fp64 for fp64). For cosine similarity they read the raw embeddings and
their inverse norms (:func:`inverse_norms`, fp32) and scale each dot product by both, so no
normalised copy exists; the backward maps the gradients back through the normalisation. Under
``torch.autocast`` fp32 embeddings are fed to the kernels in the autocast dtype (the loss is a
matmul-like op); the scores and the combination stay in fp32 either way.

Two options of the loss run fused in the same kernels (constexprs ``LOGQ`` and ``EXTRA``; with
neither, the kernels compile to the code of the plain loss):

* the sampling-bias correction (hdccf_triton/LOSS.md, "Sampling-bias correction"): every
  negative column's score is lowered by ℓ of its id in the sums over negatives,
  A[k, j] − ℓᴵ(X_j), E[k, j] − ℓᴵ(X_j), B[k, j] − ℓᵁ(Y_j), C[k, j] − ℓᵁ(Y_j) (s and the own
  blocks uncorrected; ℓ constant). The host gathers ℓ per column
  (:func:`~hdccf_triton.terms.column_log_q`) and hands the kernels q₂ = ℓ·log2(e) (in float64,
  then cast to the accumulation dtype), which they subtract from the base-2 scores t·f;
* mixed negatives (hdccf_triton/LOSS.md, "Mixed negatives"): the B′ extra items and users are
  appended to the flattened pools as columns N·P .. N·P + B′ − 1 (``torch.cat`` outside the
  autograd.Function, so their gradients flow back to the extras as the pools' do), with the
  same false-negative test and no own block; they enter A and B only. The forward's column
  splits never straddle the pool's end, so that the counts over the pool columns alone
  (``n_item_aux``, ``n_user_aux``, those of the C and E terms) are the sums over the pool
  splits, and n_item, n_user those over every split. The concatenation is the one copy of
  the pools this path makes ([N·P + B′, d] for X and for Y, and their gradients).

The true-negative masks (hdccf_triton/LOSS.md, "False negatives") are computed once per batch
as bits, two per (row, column) pair (``kernels/negative_mask.py``), kept from the forward to
the backward and read by all three passes, which then test one bit per pair instead of
gathering twice from D; where those bits would take more than :data:`MASK_BITS_MAX_BYTES`
(:func:`uses_mask_bits`), each pass gathers the masks itself. The two give the same masks, so
the same results bit for bit.

Memory above the inputs: the gradients themselves, O(M + N·P) statistics (and inverse norms),
the masks' bits (M·C/4 bytes for C columns, at most :data:`MASK_BITS_MAX_BYTES`) and the
backward's fp32 partial gradients when a pass is split (:func:`launch_config` bounds
those of the row pass by the pool gradients the column pass allocates anyway).

Triton is imported lazily (:mod:`._triton_runtime` loads the kernels), so
``import hdccf_triton`` works where it is absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..interactions import InteractionIndex
from ..options import LossOptions
from ..terms import LossInputs, NegativeStats, Scores, column_log_q, combine_terms
from ._triton_runtime import (
    NO_OVERRIDES, CallSetup, LaunchOverrides, accumulation_dtype, cdiv, empty, interpreting, kernel_ids,
    column_splits, load_kernels, merge_column_splits, sm_count, split_size, without_dynamo,
)

__all__ = ["per_row_loss", "kernel_inputs", "inverse_norms", "fused_scores", "negative_statistics",
           "LaunchConfig", "KernelLaunch", "launch_config", "uses_mask_bits", "MASK_BITS_MAX_BYTES"]


def per_row_loss(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                 row_offset: int = 0, *, overrides: LaunchOverrides = NO_OVERRIDES) -> torch.Tensor:
    """loss[k] of hdccf_triton/LOSS.md for every row, with ``options.similarity`` a
    :class:`~hdccf_triton.similarity.Dot` or :class:`~hdccf_triton.similarity.Cosine`; the
    arguments of :func:`hdccf_triton.backends.reference.per_row_loss`.

    Returns:
        ``[M]`` per-row loss, float32 for half-precision inputs, else the input dtype.
    """
    if options.similarity.kernel != "dot":
        raise ValueError(f"triton_dot computes the dot and cosine similarities, got {options.similarity!r}")
    extra = inputs.extra
    if extra is not None:  # the mixed negatives in the kernels' dtype, as the pools
        dtype = kernel_dtype(inputs.user_emb.dtype, inputs.user_emb.device)
        extra = extra.with_embeddings(*(t.to(dtype) for t in extra[:2]))
    kernel_in = inputs.with_embeddings(*kernel_inputs(*inputs.embeddings), extra=extra)
    scores, stats = fused_scores(kernel_in, interactions, options, row_offset, overrides=overrides)
    return combine_terms(scores, stats, options)


def kernel_inputs(user_emb, item_emb, pool_item_emb, pool_user_emb):
    """The embeddings as the kernels read them: in the input dtype, or the autocast dtype for
    fp32 under autocast (raw for ``"cosine"`` too: the kernels normalise on the fly)."""
    dtype = kernel_dtype(user_emb.dtype, user_emb.device)
    return tuple(t.to(dtype) for t in (user_emb, item_emb, pool_item_emb, pool_user_emb))


#: ε of the cosine normalisation e / max(‖e‖, ε), as ``F.normalize`` and the reference
COSINE_EPS = 1e-12
#: rows per chunk of :func:`inverse_norms`: at most 2**18 elements of fp32 temporaries
_NORM_CHUNK_ELEMENTS = 1 << 18


def inverse_norms(e: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` → ``[n]`` 1/max(‖e‖, ε) in the accumulation dtype, negated where ‖e‖ ≤ ε
    (the kernels then take e/ε with the gradient g/ε, as ``F.normalize``). In chunks of rows,
    so that no fp32 copy of a pool exists; not differentiable (the kernels' backward
    accounts for the norms)."""
    acc = accumulation_dtype(e.dtype)
    out = torch.empty(e.shape[0], dtype=acc, device=e.device)
    step = max(1, _NORM_CHUNK_ELEMENTS // max(1, e.shape[-1]))
    with torch.no_grad():
        for start in range(0, e.shape[0], step):
            norm = torch.linalg.vector_norm(e[start:start + step].to(acc), dim=-1)
            out[start:start + step] = torch.where(norm > COSINE_EPS, 1.0 / norm, -1.0 / COSINE_EPS)
    return out


def kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the kernels read: the input's, or the autocast dtype for fp32 under autocast."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def negative_statistics(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                        row_offset: int = 0, *, overrides: LaunchOverrides = NO_OVERRIDES) -> NegativeStats:
    """:func:`hdccf_triton.backends.reference.negative_statistics` in the fused Triton kernels:
    the statistics part of :func:`fused_scores` (same arguments)."""
    return fused_scores(inputs, interactions, options, row_offset, overrides=overrides)[1]


@without_dynamo
def fused_scores(
    inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions, row_offset: int = 0, *,
    overrides: LaunchOverrides = NO_OVERRIDES,
) -> tuple[Scores, NegativeStats]:
    """Every score the loss needs, from the fused kernels, differentiable in the embeddings.

    Args:
        inputs: U, I ``[M, d]`` and X, Y ``[N, P, d]`` pools (N ≥ M blocks), all of one dtype
            among fp64, fp32, bf16, fp16, as :func:`kernel_inputs` gives them (raw for cosine:
            the kernels normalise on the fly); users, items ``[M]``; pool_items, pool_users
            ``[N, P]`` int64; row k's own block is ``row_offset + k``. Optional: ``extra``, the
            mixed negatives (item_emb, user_emb ``[B′, d]`` in the same dtype, raw; ids
            ``[B′]``), and ``log_q``, the sampling-correction tables.
        overrides: explicit launch choices (tests, benchmarks).

    Returns:
        ``(scores, stats)``: :class:`~hdccf_triton.terms.Scores` (s ``[M]``, own_A .. own_E
        ``[M, P]``, U, I, X, Y and ``extra`` as given) and
        :class:`~hdccf_triton.terms.NegativeStats` (lse fields ``[M]``; counts int64, with
        ``n_item_aux``, ``n_user_aux`` over the pool columns when there are extra columns);
        floats in fp32 (fp64 for fp64 inputs).
    """
    U, I, X, Y = inputs.embeddings
    M, d = U.shape
    N, P, _ = X.shape
    n_pool = N * P
    # the columns: the flattened pools, then the B′ mixed negatives (a differentiable concatenation,
    # outside the autograd.Function: the gradients of the extra columns reach the extras)
    X2, Y2 = X.reshape(n_pool, d), Y.reshape(n_pool, d)
    if inputs.extra is not None:
        X2, Y2 = torch.cat([X2, inputs.extra.item_emb]), torch.cat([Y2, inputs.extra.user_emb])
    C = X2.shape[0]
    cosine = options.similarity.normalize
    mask_bits = uses_mask_bits(M, C, overrides)
    setup = _Setup.of(
        inputs, interactions, options, row_offset, overrides,
        inv_norms=tuple(inverse_norms(t) for t in (U, I, X2, Y2)) if cosine else None,
        cosine=cosine,
        config=launch_config(M, C, d, U.device, U.dtype, overrides, mask_bits),
        n_pool=n_pool,
        log_q2=_log_q2(inputs, accumulation_dtype(U.dtype)),
        mask_bits=mask_bits,
    )
    if inputs.extra is not None:  # the column ids of the pools, then of the extras
        users, items, x_ids, y_ids = inputs.ids
        x_ids = torch.cat([x_ids.reshape(-1), inputs.extra.items])
        y_ids = torch.cat([y_ids.reshape(-1), inputs.extra.users])
        setup = replace(setup, ids=kernel_ids((users, items, x_ids, y_ids), interactions))
    lse_a, lse_b, lse_c, lse_e, counts, s, own = _FusedScores.apply(
        U.contiguous(), I.contiguous(), X2.contiguous(), Y2.contiguous(), setup
    )
    scores = Scores(U, I, X, Y, s, *own.unbind(0), inputs.extra)
    return scores, NegativeStats(lse_a, lse_b, lse_c, lse_e, *counts.unbind(0))


def _log_q2(inputs: LossInputs, dtype: torch.dtype) -> tuple | None:
    """The columns' corrections in base 2, (ℓᴵ·log2(e), ℓᵁ·log2(e)) ``[C]`` each, computed in
    float64 and cast to ``dtype`` (the accumulation dtype); None without a correction."""
    log_q = column_log_q(inputs, torch.float64)
    if log_q is None:
        return None
    return tuple((q * math.log2(math.e)).to(dtype).contiguous() for q in log_q)


@dataclass(frozen=True)
class _Setup(CallSetup):
    """Everything about one call that is not a differentiable tensor."""

    inv_norms: tuple | None  # cosine: inverse norms of U [M], I [M], X [C], Y [C]; else None
    cosine: bool
    config: "LaunchConfig"
    n_pool: int  # N·P: columns from n_pool on (C − N·P = B′ of them) are the mixed negatives
    log_q2: tuple | None  # (qX [C], qY [C]) = ℓ·log2(e) of the columns (accumulation dtype), or None
    mask_bits: bool  # the masks as bits, computed once per batch (:func:`uses_mask_bits`)

    @property
    def extra(self) -> bool:
        """Whether there are mixed negatives (columns beyond the pool)."""
        return self.ids[2].shape[0] > self.n_pool


class _FusedScores(torch.autograd.Function):
    """(U, I, X, Y) ↦ (lse_A, lse_B, lse_C, lse_E, counts, s, own); X, Y ``[C, d]`` the
    columns (pool, then extras); counts int64 ``[2, M]`` (n_item, n_user) or, with extra
    columns, ``[4, M]`` (n_item, n_user, n_item_aux, n_user_aux), not differentiable; own
    ``[4, M, P]`` stacks own_A, own_B, own_C, own_E."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, U, I, X, Y, setup: _Setup):
        with torch.autocast(U.device.type, enabled=False):
            lse2, counts, s, own, bits = _forward(U, I, X, Y, setup)
        ctx.setup = setup
        # the backward reads the base-2 log-sum-exps as the forward wrote them (its weights
        # 2^(t·f − lse₂) then sum to 1 with no rounding of a conversion in between), and the
        # masks' bits (None when the passes gather them)
        ctx.save_for_backward(U, I, X, Y, lse2, bits)
        # independent [M] outputs in natural units, lse = ln2·lse₂ (converted in float64)
        lse_a, lse_b, lse_c, lse_e = (lse2.double() * math.log(2.0)).to(lse2.dtype).unbind(0)
        ctx.mark_non_differentiable(counts)
        return lse_a, lse_b, lse_c, lse_e, counts, s, own

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_a, g_b, g_c, g_e, _g_counts, g_s, g_own):
        U, I, X, Y, lse, bits = ctx.saved_tensors  # lse: base 2
        need_rows = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_cols = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        M, P = U.shape[0], ctx.setup.P
        with torch.autocast(U.device.type, enabled=False):
            grads = [g if g is not None else torch.zeros_like(lse[0]) for g in (g_a, g_b, g_c, g_e)]
            G = torch.stack(grads).to(lse.dtype).contiguous()  # [4, M]
            GS = (g_s if g_s is not None else torch.zeros_like(lse[0])).to(lse.dtype).contiguous()  # [M]
            if g_own is None:
                g_own = torch.zeros((4, M, P), dtype=lse.dtype, device=lse.device)
            GOWN = g_own.to(lse.dtype).contiguous()  # [4, M, P]
            dU, dI, dX, dY = _backward(U, I, X, Y, lse, bits, G, GS, GOWN, ctx.setup, need_rows, need_cols)
        return dU, dI, dX, dY, None


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelLaunch:
    """Tiles and work split of one kernel.

    Attributes:
        block_m, block_n: rows and pool columns per tile (≥ 16: ``tl.dot`` needs it on GPU).
        num_warps: warps per program.
        splits: the forward and the row-parallel backward cut the N·P columns into this many
            contiguous ranges, the column-parallel backward the M rows (more programs when
            the parallel dimension is short); the partial results are merged on the host in
            a fixed order.
    """

    block_m: int
    block_n: int
    num_warps: int
    splits: int


@dataclass(frozen=True)
class LaunchConfig:
    """The launches of the three kernels: a fixed heuristic, never autotuned (autotuning
    picks configurations by timing, which would break run-to-run determinism).

    Attributes:
        block_d: the next power of two ≥ max(d, 16); the embedding dim is masked up to it.
        num_stages: software pipelining depth of the column (row) loops.
        maxnreg: register cap per thread passed to ptxas, or None (its default). The fp32 /
            fp64 kernels set 255: their IEEE products run on the FMA units, and with 4 warps
            ptxas otherwise settles on 32 registers and spills kilobytes.
        fwd, rows, cols: the forward, the row-parallel (dU, dI) and the column-parallel
            (dX, dY) backward.
    """

    block_d: int
    num_stages: int
    maxnreg: int | None
    fwd: KernelLaunch
    rows: KernelLaunch
    cols: KernelLaunch


#: GPU tiles (block_m, block_n, num_warps) of (forward, row pass, column pass) by block_d, chosen
#: from ``python bench/sass_report.py`` (SASS instructions per (row, column) pair and spills of
#: the sweep loop, compiled exactly as the launch compiles them; a static estimate for sm_90,
#: bf16, bitmap index, to be confirmed on the GPU by the A/B rows of bench/kernel_bench.py),
#: with the masks read from the batch's bits (:func:`uses_mask_bits`):
#:
#: * a tile's rows must match its warps: the chained dots put every warp along the rows (one
#:   warpgroup covers 64 rows), so 8 warps on 64 rows compute every score tile twice;
#: * with the masks as bits, no gather and no count is left in the sweeps, and the forward
#:   holds 137 registers at 64 × 32: 32 columns halve its per-row work (max, rescale) against
#:   16 (41 instructions per pair against 54), 64 spill;
#: * d ≤ 64: 64 × 32 for the forward, 64 × 64 for both backward passes, 4 warps (41, 36 and 35
#:   instructions per pair, no spill);
#: * d = 128: 64 × 32 for the forward (48), 16 × 32 for both backward passes (86 and 88), 4 warps:
#:   the tiles with no spill in the loop for dot and cosine (32 × 32 costs 71 and 78 for dot but
#:   spills 8 and 85 instructions for cosine, 64 × 16 spills in the row pass).
_GPU_TILES = {
    64: ((64, 32, 4), (64, 64, 4), (64, 64, 4)),
    128: ((64, 32, 4), (16, 32, 4), (16, 32, 4)),
    256: ((32, 16, 4), (16, 32, 8), (16, 16, 4)),
}

#: the tiles when every pass gathers its masks from D (the bits would take more than
#: :data:`MASK_BITS_MAX_BYTES`): the gathers and per-element counts hold registers, so the forward
#: keeps 16 columns (80 instructions per pair at d ≤ 64; 32 columns spill), the row pass 64 × 16
#: (69), the column pass 64 × 64 (77: its transposed products need 64 columns for wgmma); at
#: d = 128 the row pass 32 × 16 (162) and the column pass 32 × 32 with 8 warps (216, its 32-row
#: score tiles computed twice; 32 × 16 with 8 warps does not spill but costs 344).
_GPU_TILES_GATHER = {
    64: ((64, 16, 4), (64, 16, 4), (64, 64, 4)),
    128: ((64, 16, 4), (32, 16, 4), (32, 32, 8)),
    256: ((32, 16, 4), (16, 32, 8), (16, 16, 4)),
}


#: the same for fp32/fp64 inputs (IEEE products on the FMA units, ``maxnreg = 255``), by
#: block_d ≤ 64 and above (above, ptxas still spills about 1 KiB a thread)
_GPU_TILES_FMA = {64: ((32, 16, 8), (16, 16, 8), (16, 16, 8)), 128: ((16, 16, 8),) * 3}
#: and with the masks as bits: the forward at 16 × 16 too (at 32 × 16 cosine spills 84 instructions
#: a loop iteration, as the gathered masks' forward did not)
_GPU_TILES_FMA_BITS = {64: ((16, 16, 8),) * 3, 128: ((16, 16, 8),) * 3}

#: most splits of a backward pass (each adds an fp32 [rows, d] partial gradient per input)
_MAX_GRAD_SPLITS = 4


def launch_config(
    M: int, NP: int, d: int, device: torch.device, dtype: torch.dtype | None = None,
    overrides: LaunchOverrides = NO_OVERRIDES, mask_bits: bool = True,
) -> LaunchConfig:
    """The documented heuristic for M rows, NP = N·P pool columns, embedding dim d.

    * ``block_d = max(16, next_pow2(d))``.
    * GPU: the tiles of :data:`_GPU_TILES` (:data:`_GPU_TILES_GATHER` when the passes gather
      their masks, ``mask_bits=False``; 16×16 with 4 warps beyond d = 256; chosen from the
      static SASS report ``bench/sass_report.py``), 2 stages;
      fp32/fp64 inputs: :data:`_GPU_TILES_FMA_BITS` (:data:`_GPU_TILES_FMA`) and ``maxnreg = 255``.
      Splits: enough programs for one wave over the SMs, ``splits = ceil(SMs / programs)``
      with programs = row blocks (forward, row pass) or column blocks (column pass), at most
      the number of blocks along the swept dimension, and at most 16 for the forward (its
      partials are [splits, 4, M]) and :data:`_MAX_GRAD_SPLITS` for the backward (its fp32
      partial gradients are [splits, rows, d]: memory). The row pass is further held to
      ``splits ≤ N·P·e / (a·M)`` (e, a: bytes per input and per accumulator element), so that
      its partials, freed before the column pass, never outgrow the pool gradients that pass
      allocates: splitting never raises the peak memory. The split count depends only on the
      shape, the dtype and the GPU model, so results are bit-identical run to run.
    * Interpreter: 16×16 tiles, one split (its programs run one after another anyway).

    ``overrides`` (tests, benchmarks): ``block_m``, ``block_n``, ``num_warps`` set all three
    kernels; ``col_splits`` the splits of the forward and the row pass; ``row_splits`` those
    of the column pass; ``sm_count`` takes the GPU branch for that many SMs on any device.
    """
    block_d = max(16, 1 << max(0, d - 1).bit_length())
    n_sm = sm_count(device, overrides)
    if n_sm is not None:
        tiles = (_GPU_TILES if mask_bits else _GPU_TILES_GATHER).get(max(64, block_d), ((16, 16, 4),) * 3)
        maxnreg = None
        if dtype in (torch.float32, torch.float64):  # IEEE products on the FMA units
            table = _GPU_TILES_FMA_BITS if mask_bits else _GPU_TILES_FMA
            tiles, maxnreg = (table[64] if block_d <= 64 else table[128]), 255

        def launch(tile, parallel, swept, along_rows, cap):
            bm, bn, warps = tile
            programs = -(-parallel // (bm if along_rows else bn))
            blocks = -(-swept // (bn if along_rows else bm))
            return KernelLaunch(bm, bn, warps, max(1, min(blocks, cap, -(-n_sm // programs))))

        elt = torch.empty((), dtype=dtype or torch.float32).element_size()
        row_cap = NP * elt // ((8 if dtype == torch.float64 else 4) * M)
        config = LaunchConfig(
            block_d, 2, maxnreg,
            fwd=launch(tiles[0], M, NP, True, cap=16),
            rows=launch(tiles[1], M, NP, True, cap=max(1, min(_MAX_GRAD_SPLITS, row_cap))),
            cols=launch(tiles[2], NP, M, False, cap=_MAX_GRAD_SPLITS),
        )
    else:
        one = KernelLaunch(16, 16, 1, 1)
        config = LaunchConfig(block_d, 1, None, one, one, one)
    # the column splits are the `splits` of the forward and the row pass, the row splits those of the column pass
    fwd, rows = (overrides.apply(k, col_splits="splits") for k in (config.fwd, config.rows))
    return replace(config, fwd=fwd, rows=rows, cols=overrides.apply(config.cols, row_splits="splits"))


def _common_args(U, I, X, Y, setup: _Setup, acc_dtype):
    """The kernels' leading arguments, up to ``scale, RU, RI, RX, RY`` (the last five)."""
    index_args = setup.index_args(acc_dtype, U.device)
    norms = setup.inv_norms or index_args[-1:] * 4  # never read without COSINE
    return (U, I, X, Y, *index_args, *norms)


def _sweep_args(common: tuple, setup: _Setup, bits: torch.Tensor | None) -> tuple:
    """The arguments of the three sweep kernels up to their outputs: :func:`_common_args`, then
    the columns' corrections ``QX, QY`` (the scale vector, never read, without LOGQ) and the
    masks' bits ``BI, BU`` (``bits [2, M, W]``; the scale vector, never read, without them)."""
    unused = common[-5:-4]
    return (*common, *(setup.log_q2 or unused * 2), *(bits.unbind(0) if bits is not None else unused * 2))


def _words(bits: torch.Tensor | None) -> int:
    """W, the words a row of the masks' bits (1, never read, without them)."""
    return bits.shape[2] if bits is not None else 1


def _constexprs(U, setup: _Setup, launch: KernelLaunch) -> dict:
    return dict(
        DEBIAS=setup.debias,
        INDEX_MODE=setup.index.mode,
        SEARCH_STEPS=setup.index.search_steps,
        # the interpreter cannot multiply bf16 tiles (triton-lang/triton#11584)
        UPCAST=interpreting() and U.dtype == torch.bfloat16,
        COSINE=setup.cosine,
        LOGQ=setup.log_q2 is not None,
        EXTRA=setup.extra,
        MASK_BITS=setup.mask_bits,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=setup.config.block_d,
        num_warps=launch.num_warps, num_stages=setup.config.num_stages,
        **({"maxnreg": setup.config.maxnreg} if setup.config.maxnreg else {}),
    )


#: rows per program of the own-block scores (a light, memory-bound kernel)
_OWN_BLOCK_M = 16


def _forward(U, I, X, Y, setup: _Setup):
    """lse₂ ``[4, M]`` (A, B, C, E; base 2: lse·log2(e)) and s ``[M]``, own ``[4, M, P]`` in the
    accumulation dtype; counts int64 ``[2, M]`` (n_item, n_user), or ``[4, M]`` with the
    pool-column counts n_item_aux, n_user_aux after them when there are extra columns; the
    masks' bits ``[2, M, W]`` int32 (None when the passes gather the masks)."""
    kernels = load_kernels()
    M, d = U.shape
    NP = X.shape[0]
    acc = accumulation_dtype(U.dtype)
    k = setup.config.fwd
    cols_per_split, pool_splits, splits = column_splits(setup.n_pool, NP - setup.n_pool, k.splits, k.block_n)
    lse_parts = empty((splits, 4, M), acc, U.device, setup.poison)
    # the forward's partial counts; none under MASK_BITS (the bits' kernel counts: empty, unwritten)
    cnt_parts = empty((splits, 0 if setup.mask_bits else 2, M), torch.int32, U.device, setup.poison)
    s = empty((M,), acc, U.device, setup.poison)
    own = empty((4, M, setup.P), acc, U.device, setup.poison)
    args = _common_args(U, I, X, Y, setup, acc)
    bits = bit_counts = None
    if setup.mask_bits:  # Tᴵ and Tᵁ once, as bits, and their counts (kernels/negative_mask.py)
        bits, bit_counts = _mask_bits(setup, M, NP, U.device)
    kernels.negative_stats_fwd.negative_stats_fwd_kernel[(cdiv(M, k.block_m), splits)](
        *_sweep_args(args, setup, bits), lse_parts, cnt_parts,
        M, NP, d, setup.P, setup.row_offset, cols_per_split, setup.n_pool, _words(bits),
        **_constexprs(U, setup, k),
    )
    kernels.negative_stats_fwd.own_scores_kernel[(cdiv(M, _OWN_BLOCK_M),)](
        U, I, X, Y, *args[-5:], s, own, M, d, setup.P, setup.row_offset,
        COSINE=setup.cosine, BLOCK_M=_OWN_BLOCK_M, BLOCK_D=setup.config.block_d, num_warps=4,
    )
    lse2, counts, aux = merge_column_splits(lse_parts, cnt_parts, pool_splits, base2=True)
    if bits is not None:  # the counts of the bits' kernel (the forward's are empty)
        counts, aux = bit_counts[:2], (bit_counts[2:] if setup.extra else None)
    if aux is not None:  # the pool splits' counts: over the pool columns alone (C and E)
        counts = torch.cat([counts, aux])
    return lse2, counts, s, own, bits


#: the masks' bits (two bits a pair) are used when they take at most this many bytes (M = 4096
#: rows × C = 16,384 columns: 16 MiB; M = 16,384 × C = 65,536: 256 MiB, where the eager reference
#: needs GiBs); beyond, every pass gathers the masks from D
MASK_BITS_MAX_BYTES = 512 << 20
#: rows and words (32 columns each) per program of the bits' kernel (GPU; the interpreter: 16 × 1)
_MASK_BLOCK_M, _MASK_BLOCK_W = 16, 16


def uses_mask_bits(M: int, C: int, overrides: LaunchOverrides = NO_OVERRIDES) -> bool:
    """Whether the kernels read the true-negative masks from bits computed once per batch
    (``kernels/negative_mask.py``; 2·M·(ceil(C/32) + 2) int32 words, kept from the forward to the
    backward) rather than gathering them from D in each of the three passes: when those bits take
    at most :data:`MASK_BITS_MAX_BYTES`, unless ``overrides.mask_bits`` says otherwise. Both
    ways give the same masks, hence bit-identical results."""
    if overrides.mask_bits is not None:
        return overrides.mask_bits
    return 2 * M * (cdiv(C, 32) + 2) * 4 <= MASK_BITS_MAX_BYTES


def _mask_bits(setup: _Setup, M: int, C: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bits of Tᴵ and Tᵁ ``[2, M, W]`` int32, W = ceil(C/32) + 2 (two words of padding), and
    the counts ``[4, M]`` int64 (n_item, n_user, n_item_aux, n_user_aux), from
    ``true_negative_bits_kernel``."""
    kernels = load_kernels()
    W = cdiv(C, 32) + 2
    bits = empty((2, M, W), torch.int32, device, setup.poison)
    counts = empty((4, M), torch.int32, device, setup.poison)
    block_m, block_w = (16, 1) if interpreting() else (_MASK_BLOCK_M, _MASK_BLOCK_W)
    layout = setup.index
    kernels.negative_mask.true_negative_bits_kernel[(cdiv(M, block_m),)](
        *setup.ids, layout.tensor, layout.n_keys, layout.num_items, bits[0], bits[1], counts,
        M, C, W, setup.P, setup.row_offset, setup.n_pool,
        DEBIAS=setup.debias, INDEX_MODE=layout.mode, SEARCH_STEPS=layout.search_steps,
        BLOCK_M=block_m, BLOCK_W=block_w, num_warps=4,
    )
    return bits, counts.to(torch.int64)


def _backward(U, I, X, Y, lse, bits, G, GS, GOWN, setup: _Setup, need_rows: bool, need_cols: bool):
    kernels = load_kernels()
    M, d = U.shape
    NP = X.shape[0]
    acc = accumulation_dtype(U.dtype)
    args = _common_args(U, I, X, Y, setup, acc)
    dU = dI = dX = dY = None
    if need_rows:
        k = setup.config.rows
        cols_per_split, splits = split_size(NP, k.splits, k.block_n)
        # one split: the kernel stores the gradient in the input dtype (no fp32 buffer);
        # several: fp32 partials, added on the host
        dtype = acc if splits > 1 else U.dtype
        dU_parts = empty((splits, M, d), dtype, U.device, setup.poison)
        dI_parts = empty((splits, M, d), dtype, U.device, setup.poison)
        kernels.negative_stats_bwd.negative_stats_bwd_rows_kernel[(cdiv(M, k.block_m), splits)](
            *_sweep_args(args, setup, bits), lse, G, GS, GOWN, dU_parts, dI_parts,
            M, NP, d, setup.P, setup.row_offset, cols_per_split, setup.n_pool, _words(bits),
            **_constexprs(U, setup, k),
        )
        dU, dI = _merge(dU_parts, U.dtype), _merge(dI_parts, I.dtype)
        del dU_parts, dI_parts  # before the column pass allocates its own
    if need_cols:
        k = setup.config.cols
        rows_per_split, splits = split_size(M, k.splits, k.block_m)
        dtype = acc if splits > 1 else X.dtype
        dX_parts = empty((splits, NP, d), dtype, U.device, setup.poison)
        dY_parts = empty((splits, NP, d), dtype, U.device, setup.poison)
        kernels.negative_stats_bwd.negative_stats_bwd_cols_kernel[(cdiv(NP, k.block_n), splits)](
            *_sweep_args(args, setup, bits), lse, G, GS, GOWN, dX_parts, dY_parts,
            M, NP, d, setup.P, setup.row_offset, rows_per_split, setup.n_pool, _words(bits),
            **_constexprs(U, setup, k),
        )
        dX, dY = _merge(dX_parts, X.dtype), _merge(dY_parts, Y.dtype)
    return dU, dI, dX, dY


def _merge(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ over the splits (dim 0, in a fixed order: deterministic), in ``dtype``."""
    if parts.shape[0] == 1:
        return parts[0] if parts.dtype == dtype else parts[0].to(dtype)
    return parts.sum(0).to(dtype)
