"""Negatives gathered across ranks: the loss of multi-GPU (or multi-process) training.

With ``gather_across_ranks=True`` (an option of :func:`~hdccf_triton.debiased_contrastive_loss`
and of :class:`~hdccf_triton.DebiasedContrastiveLoss`), each of the W ranks of an initialised
``torch.distributed`` process group keeps its own M rows (``user_emb``, ``item_emb``,
``users``, ``items``) and scores them against the pools of **all** ranks, gathered in rank
order: N = M·W pool blocks, row k's own block at ``rank·M + k``, Q = P·(M·W − 1) negatives per
row. This is open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` for HDCCF.

Exactness. The local per-row losses of rank r are the rows ``r·M .. r·M + M − 1`` of the
single-process loss of the *global batch* (the W local batches concatenated in rank order),
to rounding: summing the local ``reduction="sum"`` losses over ranks gives the global
``"sum"`` loss. The pool embeddings are gathered with an autograd all-gather whose backward
**sums** the gradients every rank computed for a block and returns them to the block's owner
(a reduce-scatter; an all-reduce on backends without one). So after ``loss.backward()`` on each
rank, the gradient of every local embedding tensor (rows and pools) is the gradient of
Σ_ranks(local loss), the cross-rank contributions included.

Scaling under DistributedDataParallel (what to do to get the gradient of the global mean).
DDP *averages* parameter gradients over the W ranks. With ``reduction="mean"`` each rank
back-propagates L_r / M (L_r the sum of its M row losses); the all-gather's backward makes
each rank's gradient the share, through its own inputs, of ∇(Σ_r L_r / M) = W·∇L̄ (L̄ the
mean over the M·W rows of the global batch); the shares add up to W·∇L̄, and DDP's average
divides by W. Hence:

    **DDP-averaged gradient of the local ``reduction="mean"`` loss = ∇ of the global-batch
    mean loss, exactly.** Use the local mean loss as is: no rescaling.

- With ``reduction="sum"`` DDP yields ∇(global sum) / W: multiply the local loss by W to get
  the gradient of the global sum.
- Without DDP, if you all-reduce **sum** gradients yourself, the local mean gives W·∇L̄:
  divide by W (i.e. average, as DDP does).
- Do not scale for the cross-rank terms yourself: the all-gather's backward already returns
  them to the owning rank.
- The loss *value* on a rank is the mean of its own rows only; the global mean, for logging,
  is ``torch.distributed.all_reduce(loss.detach()) / W``.

Requirements.

- Every rank calls the loss at every step with the **same M, P, d and dtype** (the shapes
  are all-gathered and compared at each call; a mismatch raises the same ValueError on every
  rank). Drop the last partial batch (:func:`shard_indices` does) or pad it.
- Every rank runs the backward (the all-gather's backward is a collective).
- The loss issues three collectives per call on the default process group (shapes, pool
  ids, pool embeddings) and one in backward; ranks must reach them in the same order, which
  they do when all ranks run the same model code (as DDP requires anyway).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .terms import LossInputs

__all__ = ["gather_pools", "shard_indices", "all_gather_with_grad"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCE_SCATTER_BACKENDS = ("nccl", "xccl")


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gather_across_ranks=True needs an initialised torch.distributed process group: "
            "call torch.distributed.init_process_group(...) first (torchrun sets up its "
            "environment), or pass gather_across_ranks=False in a single process"
        )


def gather_pools(inputs: LossInputs, group=None) -> tuple[LossInputs, int]:
    """The local rows with the pools of every rank, and the offset of the local own blocks.

    Args:
        inputs: this rank's validated inputs: rows ``[M, d]`` / ``[M]``, pools
            ``[M, P, d]`` / ``[M, P]``.
        group: the process group (None: the default group).

    Returns:
        ``(gathered, row_offset)``: ``gathered`` keeps the local ``user_emb``, ``item_emb``,
        ``users``, ``items`` and holds the pools of all W ranks concatenated in rank order,
        ``pool_item_emb``/``pool_user_emb`` ``[M·W, P, d]`` (gathered with autograd: see the
        module docstring) and ``pool_items``/``pool_users`` ``[M·W, P]``;
        ``row_offset = rank·M``. With W = 1, ``(inputs, 0)``.

    Raises:
        RuntimeError: no initialised process group, or this process is not in ``group``.
        ValueError: the ranks' batches differ in M, P, d or dtype (raised on every rank).
    """
    _require_process_group()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("gather_across_ranks=True: this process is not a member of the process group")
    if world == 1:
        return inputs, 0
    M, P, d = inputs.pool_item_emb.shape
    _check_same_shapes(inputs, world, group)

    pools = torch.cat([inputs.pool_item_emb, inputs.pool_user_emb], dim=1)  # [M, 2P, d]
    pools = all_gather_with_grad(pools, group)  # [M·W, 2P, d]
    ids = torch.cat([inputs.pool_items, inputs.pool_users], dim=1).contiguous()  # [M, 2P]
    parts = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(parts, ids, group=group)
    ids = torch.cat(parts)  # [M·W, 2P]
    gathered = inputs._replace(
        pool_item_emb=pools[:, :P].contiguous(),
        pool_user_emb=pools[:, P:].contiguous(),
        pool_items=ids[:, :P].contiguous(),
        pool_users=ids[:, P:].contiguous(),
    )
    return gathered, rank * M


def _check_same_shapes(inputs: LossInputs, world: int, group) -> None:
    """All-gather (M, P, d, dtype) once and raise the same ValueError everywhere on a mismatch."""
    M, P, d = inputs.pool_item_emb.shape
    dtype = inputs.pool_item_emb.dtype
    code = _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)
    mine = torch.tensor([M, P, d, code], dtype=torch.int64, device=inputs.pool_item_emb.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    shapes = torch.stack(parts).tolist()
    if all(s == shapes[0] for s in shapes):
        return
    names = [str(_DTYPES[c]).removeprefix("torch.") if c < len(_DTYPES) else "other" for *_, c in shapes]
    per_rank = "; ".join(
        f"rank {r}: M={m}, P={p}, d={dd}, {n}" for r, ((m, p, dd, _), n) in enumerate(zip(shapes, names))
    )
    raise ValueError(
        "gather_across_ranks=True needs the same batch shape (M rows, P pool entries, d "
        f"dimensions, dtype) on every rank, got {per_rank}. Drop the last partial batch "
        "(hdccf_triton.distributed.shard_indices does; or DistributedSampler(drop_last=True) "
        "with DataLoader(drop_last=True)) or pad it to the full batch size"
    )


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate ``x`` of every rank along dim 0; backward: sum the gradients over ranks and
    return each rank the rows of its own ``x`` (reduce-scatter semantics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) in _REDUCE_SCATTER_BACKENDS:
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            reduce_scatter(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        else:  # gloo & co: no reduce-scatter everywhere; all-reduce and keep our rows
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
            out = grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
        return out, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x`` (``[n, ...]``, the same shape on every rank) of all W ranks, concatenated in rank
    order: ``[n·W, ...]``.

    Differentiable: the gradient returned to ``x`` on rank r is the sum over all ranks of the
    gradient of their gathered copy's block r (like ``torch.distributed.nn.functional.all_gather``,
    which torch 2.13 deprecates; this one works on gloo, NCCL and torch >= 2.4 alike).
    """
    _require_process_group()
    if dist.get_world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def shard_indices(
    perm: torch.Tensor | Sequence[int], rank: int, world_size: int, batch_size: int
) -> torch.Tensor:
    """This rank's share of an epoch's permutation: whole local batches, the same number on
    every rank.

    The permutation (identical on every rank: draw it from a generator seeded with the epoch)
    is cut into global batches of ``world_size·batch_size`` indices; the tail that does not
    fill a global batch is dropped. Rank r gets, for each global batch t, its r-th slice of
    ``batch_size`` indices, so local batch t of rank r is
    ``perm[(t·W + r)·B : (t·W + r + 1)·B]`` and the W local batches of step t, concatenated in
    rank order, are exactly the global batch ``perm[t·W·B : (t+1)·W·B]``: with
    ``gather_across_ranks=True`` the ranks together compute the loss a single process with
    batch size W·B would compute on the same permutation.

    Args:
        perm: ``[n]`` indices (a tensor or a sequence of ints).
        rank: this rank, in ``[0, world_size)``.
        world_size: W ≥ 1.
        batch_size: B ≥ 1, the local batch size.

    Returns:
        ``[T·B]`` int64 (``T = n // (W·B)`` local batches, in order), on ``perm``'s device;
        split it with ``.split(batch_size)``.
    """
    for name, v in (("world_size", world_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError(f"perm must be a 1-D tensor of integer indices, got {perm.dtype} {tuple(perm.shape)}")
    steps = perm.numel() // (world_size * batch_size)
    blocks = perm[: steps * world_size * batch_size].reshape(steps, world_size, batch_size)
    return blocks[:, rank].reshape(-1).to(torch.int64)
