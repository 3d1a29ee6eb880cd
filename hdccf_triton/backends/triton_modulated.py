"""The Triton backend of the modulated similarity (eqs. 7-8): the fused kernels of
``kernels/modulated_fwd.py`` and ``kernels/modulated_bwd.py`` behind an autograd.Function.

As in :mod:`.triton_dot`, only the per-row log-sum-exps over the true
negatives run in Triton; the positive and own-block scores and the combination of the terms
are :mod:`hdccf_triton.terms`'s. The kernels compute all four families: A and B with the
pairwise modulation inside the score tiles, C and E as dot products of the p and q halves.

What the host does (all O((M + N·P)·d) work, in torch, so autograd handles it):

* splits the ``[.., 2·dim]`` inputs into p/q and e, casts them to the accumulation dtype
  (fp32; fp64 for fp64 inputs: the modulated path has no half-precision kernels, the
  elementwise pair work dominates);
* computes the per-entity pre-activations h = W₁e (+ b) and W₂e (+ b) once, so that the
  kernels only form the pairwise W₃(e_i ⊙ e_u);
* normalises the c = p/q halves of f_uu and f_ii for ``normalize=True``;
* packs rows ``[8, M, dim]`` and columns ``[8, N·P, dim]`` (slots: ``modulated_fwd.py``).

The kernels return the gradients of these operands and of W₃ (per-program partial sums,
added in a fixed order: deterministic, no atomics); autograd carries them to p, q, e, W and b.
No [M, N·P] or [M, N·P, dim] tensor is allocated.

The two options of hdccf_triton/LOSS.md, fused in the same kernels (constexprs ``LOGQ`` and
``EXTRA``: when both are off the kernels' code is that of the plain loss):

* "Sampling-bias correction" (``inputs.log_q``): every negative column's score is lowered by
  the ℓ of its id in the four sums over negatives (A − ℓᴵ, E − ℓᴵ, B − ℓᵁ, C − ℓᵁ); the host
  gathers ℓᴵ, ℓᵁ ``[C]`` per column (:func:`~hdccf_triton.terms.column_log_q`, in float64,
  then cast to the kernels' dtype; natural-log units, as the kernels' ``tl.exp``). Constants.
* "Mixed negatives" (``inputs.extra``): the B′ extra items and users are columns
  N·P .. N·P + B′ − 1 after the pools' (C = N·P + B′ columns, packed like the pools'), with
  the same false-negative test and no own block; they enter A and B only, the kernels cut the
  masks of C and E to the pool columns. The columns are concatenated before the
  autograd.Function, so the gradients reach the pools and the extras alike. No column split
  straddles N·P: the counts of the pool splits are n_item_aux, n_user_aux, those of all
  splits n_item, n_user, each summed in a fixed order.

Triton is imported lazily (:mod:`._triton_runtime` loads the kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..interactions import InteractionIndex
from ..options import LossOptions
from ..terms import LossInputs, NegativeStats, column_log_q, combine_terms, prepare_scores
from ._triton_runtime import (
    NO_OVERRIDES, CallSetup, LaunchOverrides, accumulation_dtype, cdiv, column_splits, empty, load_kernels,
    merge_column_splits, sm_count, split_size, without_dynamo,
)

__all__ = ["per_row_loss", "negative_statistics", "LaunchConfig", "launch_config", "fits_gpu"]


def per_row_loss(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                 row_offset: int = 0, *, overrides: LaunchOverrides = NO_OVERRIDES) -> torch.Tensor:
    """loss[k] of hdccf_triton/LOSS.md with ``options.similarity`` a ModulatedSimilarity that
    modulates (the all-ones one is reduced to the dot kernels before dispatch); the arguments
    of :func:`hdccf_triton.backends.reference.per_row_loss` (embeddings ``[.., 2·dim]``).

    Returns:
        ``[M]`` per-row loss, float32 for half-precision inputs, else the input dtype.
    """
    scores = prepare_scores(inputs, options, row_offset)
    stats = negative_statistics(inputs.with_embeddings(*scores[:4], extra=scores.extra), interactions, options,
                                row_offset, overrides=overrides)
    return combine_terms(scores, stats, options)


@without_dynamo
def negative_statistics(inputs: LossInputs, interactions: InteractionIndex | None, options: LossOptions,
                        row_offset: int = 0, *, overrides: LaunchOverrides = NO_OVERRIDES) -> NegativeStats:
    """:func:`hdccf_triton.backends.reference.negative_statistics` of a ModulatedSimilarity, fused.

    Args:
        inputs: U ``[M, 2·dim]`` users ``[p ‖ e]``; I ``[M, 2·dim]`` items ``[q ‖ e]``;
            X ``[N, P, 2·dim]`` pool items; Y ``[N, P, 2·dim]`` pool users (N ≥ M blocks);
            users, items ``[M]``; pool_items, pool_users ``[N, P]`` int64; row k's own block
            is ``row_offset + k``; ``options.similarity`` modulates. Optional ``inputs.extra``:
            the B′ mixed negatives (item_emb ``[B′, 2·dim]`` ``[q ‖ e]``, user_emb ``[B′, 2·dim]``
            ``[p ‖ e]``, ids ``[B′]``), columns of A and B only; ``inputs.log_q``: the tables
            of the sampling correction ℓ, subtracted from every negative column's score.
        overrides: explicit launch choices (tests, benchmarks).

    Returns:
        :class:`~hdccf_triton.terms.NegativeStats`: lse fields in fp32 (fp64 for fp64
        inputs), differentiable with respect to U, I, X, Y, the extras' embeddings and g's
        parameters; counts int64 (n_item_aux, n_user_aux: over the pool columns, None without
        extras).
    """
    sim = options.similarity
    if sim.kernel != "modulated" or not sim.modulate:
        raise ValueError("triton_modulated needs a ModulatedSimilarity with modulate=True")
    U, I, X, Y = inputs.embeddings
    M = U.shape[0]
    N, P, _ = X.shape
    n_pool = N * P
    acc = accumulation_dtype(U.dtype)
    # the columns: the N·P pool columns, then the B′ mixed negatives ([C, 2·dim], C = N·P + B′),
    # concatenated here, outside the autograd.Function, so that autograd splits their gradients
    X, Y = X.reshape(n_pool, -1), Y.reshape(n_pool, -1)
    extra = inputs.extra
    if extra is not None:
        X, Y = torch.cat([X, extra.item_emb.to(X.dtype)]), torch.cat([Y, extra.user_emb.to(Y.dtype)])
    n_cols = X.shape[0]
    # ℓᴵ, ℓᵁ [C] of the columns, in float64 then in the kernels' dtype (natural log: tl.exp)
    log_q = column_log_q(inputs, torch.float64)
    if log_q is not None:
        log_q = tuple(t.to(acc).contiguous() for t in log_q)
    with torch.autocast(U.device.type, enabled=False):
        R, C, W3 = _operands(U, I, X, Y, sim, acc)
        setup = _Setup.of(inputs, interactions, options, row_offset, overrides, normalize=sim.normalize,
                          config=launch_config(M, n_cols, sim.dim, U.device, overrides),
                          n_pool=n_pool, log_q=log_q)
        setup = _with_extra_ids(setup, extra, n_pool)
        outs = _ModulatedStatistics.apply(R, C, W3, setup)
    lse_and_counts, aux = outs[:6], outs[6:]
    return NegativeStats(*lse_and_counts, *(aux if extra is not None else (None, None)))


def _with_extra_ids(setup: "_Setup", extra, n_pool: int) -> "_Setup":
    """The setup with the mixed negatives' ids appended to the pools' column ids ``[N·P]`` →
    ``[C]`` (in the dtype the kernels read), unless there are none or they are there already."""
    users, items, x_ids, y_ids = setup.ids
    if extra is None or x_ids.shape[0] != n_pool:
        return setup
    x_ids = torch.cat([x_ids, extra.items.to(x_ids.dtype)]).contiguous()
    y_ids = torch.cat([y_ids, extra.users.to(y_ids.dtype)]).contiguous()
    return replace(setup, ids=(users, items, x_ids, y_ids))


def _operands(U, I, X, Y, sim, acc):
    """Rows ``[8, M, dim]``, columns ``[8, C, dim]`` and W₃ ``[dim, dim]`` in ``acc``, from
    U, I ``[M, 2·dim]`` and the columns X, Y ``[C, 2·dim]`` (C = N·P pool columns, then any
    mixed negatives).

    Slots (``kernels/modulated_fwd.py``): rows p_u, e_u, W₂e_u + b, q_i, e_i, W₁e_i + b,
    c_u, c_i; columns q_X, e_X, W₁e_X, p_Y, e_Y, W₂e_Y, c_X, c_Y; c = p or q as f_uu / f_ii
    see them (normalised with ``sim.normalize``).
    """
    (p_u, e_u), (q_i, e_i), (q_x, e_x), (p_y, e_y) = (sim.split(t.to(acc)) for t in (U, I, X, Y))
    parts = sim.parts(acc)
    h_u = F.linear(e_u, parts.W_user, parts.bias)  # the user block of eq. 8, with b
    h_i = F.linear(e_i, parts.W_item, parts.bias)  # the item block, with b
    h_x = F.linear(e_x, parts.W_item)  # pool items are items: W₁
    h_y = F.linear(e_y, parts.W_user)  # pool users are users: W₂
    c_u, c_i, c_x, c_y = p_u, q_i, q_x, p_y
    if sim.normalize:
        c_u, c_i, c_x, c_y = (F.normalize(t, dim=-1, eps=1e-12) for t in (c_u, c_i, c_x, c_y))
    rows = torch.stack([p_u, e_u, h_u, q_i, e_i, h_i, c_u, c_i])  # [8, M, dim]
    cols = torch.stack([q_x, e_x, h_x, p_y, e_y, h_y, c_x, c_y])  # [8, C, dim]
    return rows.contiguous(), cols.contiguous(), parts.W_pair.contiguous()


@dataclass(frozen=True)
class _Setup(CallSetup):
    """Everything about one call that is not a differentiable tensor.

    ``ids``' column vectors have C = N·P + B′ entries (:func:`_with_extra_ids`); ``n_pool``:
    N·P, the pool columns (C > n_pool: the mixed negatives, ``EXTRA``); ``log_q``: None, or
    (ℓᴵ, ℓᵁ) ``[C]`` in the kernels' dtype (``LOGQ``).
    """

    normalize: bool
    config: "LaunchConfig"
    n_pool: int
    log_q: tuple | None

    def n_cols(self) -> int:
        """C, the columns the kernels sweep."""
        return self.ids[2].shape[0]

    def extra(self) -> bool:
        """Whether there are mixed-negative columns (the kernels' ``EXTRA``)."""
        return self.n_cols() > self.n_pool


class _ModulatedStatistics(torch.autograd.Function):
    """(rows ``[8, M, dim]``, columns ``[8, C, dim]``, W₃) ↦ (lse_A, lse_B, lse_C, lse_E,
    n_item, n_user, n_item_aux, n_user_aux), each ``[M]`` (the aux counts: over the pool
    columns; equal to n_item, n_user without mixed negatives)."""

    @staticmethod
    def forward(ctx, R, C, W3, setup: _Setup):
        lse, counts, aux = _forward(R, C, W3, setup)
        ctx.setup = setup
        ctx.save_for_backward(R, C, W3, lse)
        # independent [M] outputs, so that no output is a view of another
        lse_a, lse_b, lse_c, lse_e = (t.clone() for t in lse)
        n_item, n_user, n_item_aux, n_user_aux = (t.clone() for t in (*counts, *aux))
        ctx.mark_non_differentiable(n_item, n_user, n_item_aux, n_user_aux)
        return lse_a, lse_b, lse_c, lse_e, n_item, n_user, n_item_aux, n_user_aux

    @staticmethod
    def backward(ctx, g_a, g_b, g_c, g_e, _g_n_item, _g_n_user, _g_n_item_aux, _g_n_user_aux):
        R, C, W3, lse = ctx.saved_tensors
        need_rows = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]  # dW₃ comes with the rows
        need_cols = ctx.needs_input_grad[1]
        grads = [g if g is not None else torch.zeros_like(lse[0]) for g in (g_a, g_b, g_c, g_e)]
        G = torch.stack(grads).to(lse.dtype).contiguous()  # [4, M]
        dR, dC, dW3 = _backward(R, C, W3, lse, G, ctx.setup, need_rows, need_cols)
        return dR, dC, dW3, None


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and grid splits of the modulated kernels (one choice for all three)."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    col_splits: int  # forward and row-parallel backward: column splits
    row_splits: int  # column-parallel backward: row splits


def launch_config(
    M: int, NP: int, dim: int, device: torch.device, overrides: LaunchOverrides = NO_OVERRIDES
) -> LaunchConfig:
    """Launch heuristics (not tuned on a GPU yet).

    * 16 × 16 tiles: the pair tiles are [16, 16, BLOCK_D], flattened to [256, BLOCK_D] for the
      products with W₃ (``tl.dot`` in chunks of 8 factor entries; fp32 ``tl.dot`` needs K ≥ 8).
      8 warps from BLOCK_D = 64 on, to spread the pair tiles over more registers (``python
      bench/sass_report.py``, sm_90, d = 64, fp32: 255 registers each; spill instructions per
      tile 59 forward, 992 and 279 backward; the backward's layout changes take 88 and 84 KiB of
      shared memory; static estimate, not yet timed on a GPU).
    * From BLOCK_D = 128 on, 16 × 8 pair tiles on a GPU (``_GPU_PAIR_TILES``), and no GPU
      launch beyond BLOCK_D = 256 (``MAX_GPU_BLOCK_D``): a ``ValueError`` says so before any
      kernel is compiled (``select_backend`` sends ``"auto"`` to the reference there).
    * GPU: the columns (forward, row backward) or rows (column backward) are split so that
      about two programs run per SM; each split writes its own partial result (no atomics).
      The split count depends only on the shape and the GPU model: bit-identical run to run.
    * Interpreter: no splits (the programs run one after another anyway).
    * ``overrides`` (tests, benchmarks) replace any of these choices.
    """
    block_d = _block_d(dim)
    n_sm = sm_count(device, overrides)
    if n_sm is not None:
        if block_d > MAX_GPU_BLOCK_D and overrides.block_m is None:
            raise ValueError(
                f"dim={dim}: the modulated Triton kernels take dim <= {MAX_GPU_BLOCK_D} on a GPU (their "
                "pair tiles' layout changes outgrow shared memory beyond); use backend='torch'")
        block_m, block_n = _GPU_PAIR_TILES.get(block_d, (16, 16))
        num_warps = 4 if block_d <= 32 else 8
        row_blocks, col_blocks = -(-M // block_m), -(-NP // block_n)
        col_splits = max(1, min(col_blocks, -(-2 * n_sm // row_blocks)))
        row_splits = max(1, min(row_blocks, -(-2 * n_sm // col_blocks)))
        config = LaunchConfig(block_m, block_n, block_d, num_warps, 1, col_splits, row_splits)
    else:
        config = LaunchConfig(16, 16, block_d, 1, 1, 1, 1)
    return overrides.apply(config)


#: the GPU's pair tiles (block_m, block_n) by BLOCK_D where they are not 16 × 16: the backward's
#: layout changes of the [block_m, block_n, BLOCK_D] pair tiles go through shared memory (sm_90,
#: fp32, the larger of the two backward kernels: 88 KiB at 16 × 16 × 64, 92 KiB at 16 × 8 × 128
#: (168 KiB at 16 × 16, with more spills), 184 KiB at 16 × 8 × 256, against 227 KiB a program;
#: ``bench/sass_report.py``). block_n ≥ 8: the batched product of ``factor_grads_rows`` has
#: K = block_n, and fp32 ``tl.dot`` needs K ≥ 8.
_GPU_PAIR_TILES = {128: (16, 8), 256: (16, 8)}
#: the largest BLOCK_D the GPU launch configuration supports (the CPU interpreter takes any)
MAX_GPU_BLOCK_D = 256


def _block_d(dim: int) -> int:
    return max(16, 1 << max(0, dim - 1).bit_length())


def fits_gpu(similarity) -> bool:
    """Whether the GPU launch configuration takes this modulated similarity's ``dim``
    (BLOCK_D ≤ ``MAX_GPU_BLOCK_D``)."""
    return _block_d(similarity.dim) <= MAX_GPU_BLOCK_D


def _common_args(R, C, W3, setup: _Setup):
    """The kernels' arguments up to their outputs: operands, ids, D, the scale constants and
    the corrections QX, QY ``[C]`` (without ``LOGQ``, the scale tensor as a placeholder the
    kernels never read)."""
    index_args = setup.index_args(R.dtype, R.device)
    q_x, q_y = setup.log_q if setup.log_q is not None else (index_args[-1], index_args[-1])
    return (R, C, W3, *index_args, q_x, q_y)


def _constexprs(setup: _Setup) -> dict:
    c = setup.config
    return dict(
        NORMALIZE=setup.normalize, DEBIAS=setup.debias,
        INDEX_MODE=setup.index.mode, SEARCH_STEPS=setup.index.search_steps,
        LOGQ=setup.log_q is not None, EXTRA=setup.extra(),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )


def _forward(R, C, W3, setup: _Setup):
    """lse ``[4, M]`` (A, B, C, E) in the operands' dtype, counts ``[2, M]`` int64 over all
    columns and aux counts ``[2, M]`` int64 over the pool columns."""
    fwd = load_kernels().modulated_fwd
    _, M, dim = R.shape
    NP = C.shape[1]
    c = setup.config
    cols_per_split, pool_splits, splits = column_splits(setup.n_pool, NP - setup.n_pool, c.col_splits, c.block_n)
    lse_parts = empty((splits, 4, M), R.dtype, R.device, setup.poison)
    cnt_parts = empty((splits, 2, M), torch.int32, R.device, setup.poison)
    fwd.modulated_stats_fwd_kernel[(cdiv(M, c.block_m), splits)](
        *_common_args(R, C, W3, setup), lse_parts, cnt_parts,
        M, NP, dim, setup.P, setup.row_offset, cols_per_split, setup.n_pool, **_constexprs(setup),
    )
    lse, counts, aux = merge_column_splits(lse_parts, cnt_parts, pool_splits)
    return lse, counts, counts if aux is None else aux


def _backward(R, C, W3, lse, G, setup: _Setup, need_rows: bool, need_cols: bool):
    bwd = load_kernels().modulated_bwd
    _, M, dim = R.shape
    NP = C.shape[1]
    c = setup.config
    args = _common_args(R, C, W3, setup)
    meta = _constexprs(setup)
    dR = dC = dW3 = None
    if need_rows:
        cols_per_split, _, splits = column_splits(setup.n_pool, NP - setup.n_pool, c.col_splits, c.block_n)
        row_blocks = cdiv(M, c.block_m)
        dR_parts = empty((splits, 8, M, dim), R.dtype, R.device, setup.poison)
        dW3_parts = empty((row_blocks * splits, dim, dim), R.dtype, R.device, setup.poison)
        bwd.modulated_stats_bwd_rows_kernel[(row_blocks, splits)](
            *args, lse, G, dR_parts, dW3_parts,
            M, NP, dim, setup.P, setup.row_offset, cols_per_split, setup.n_pool, **meta,
        )
        dR = dR_parts.sum(0) if splits > 1 else dR_parts[0]
        dW3 = dW3_parts.sum(0)  # fixed order over the programs: deterministic
    if need_cols:
        rows_per_split, splits = split_size(M, c.row_splits, c.block_m)
        dC_parts = empty((splits, 8, NP, dim), R.dtype, R.device, setup.poison)
        bwd.modulated_stats_bwd_cols_kernel[(cdiv(NP, c.block_n), splits)](
            *args, lse, G, dC_parts,
            M, NP, dim, setup.P, setup.row_offset, rows_per_split, setup.n_pool, **meta,
        )
        dC = dC_parts.sum(0) if splits > 1 else dC_parts[0]
    return dR, dC, dW3
