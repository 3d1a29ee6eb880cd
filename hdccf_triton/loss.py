"""The public loss: the functional form, the nn.Module, and the one choice of backend.

Every call goes the same way: the options are validated (:class:`LossOptions`), the inputs
are validated into one :class:`~hdccf_triton.terms.LossInputs`, the similarity is reduced to
its simplest equal form (the all-ones modulation is the dot of the embedding halves), the
pools are gathered across ranks when asked, and :func:`select_backend` picks one backend
by device × similarity. The backend returns the per-row loss; :func:`reduce` reduces it.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import reference, triton_dot, triton_modulated, unavailable_reason
from .interactions import InteractionIndex
from .options import LossOptions
from .similarity import Similarity, as_similarity
from .terms import ExtraNegatives, reduce_similarity
from .validation import validate_inputs

__all__ = ["debiased_contrastive_loss", "DebiasedContrastiveLoss", "BackendUnavailableError", "select_backend"]

#: the Triton backend of each kernel family (``Similarity.kernel``)
_TRITON_BACKENDS = {"dot": triton_dot, "modulated": triton_modulated}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def debiased_contrastive_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    pool_item_emb: torch.Tensor,
    pool_user_emb: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    pool_items: torch.Tensor,
    pool_users: torch.Tensor,
    *,
    interactions: InteractionIndex | None = None,
    temperature: float = 0.1,
    omega_user: float = 0.0,
    omega_item: float = 0.0,
    lambda_user: float = 1.0,
    lambda_item: float = 1.0,
    similarity: "str | Similarity" = "dot",
    debias: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    gather_across_ranks: bool = False,
    item_log_q: torch.Tensor | None = None,
    user_log_q: torch.Tensor | None = None,
    extra_negatives: ExtraNegatives | None = None,
) -> torch.Tensor:
    """The HDCCF loss (hdccf_triton/LOSS.md) of a batch of M observed pairs with in-batch negatives.

    Row k is the observed pair (users[k], items[k]); ``pool_items[k]`` are P items sampled from
    the other training items of users[k], ``pool_users[k]`` P users sampled from the other
    training users of items[k]. Every pool entry of the other rows is a negative of row k:
    Q = P·(M−1) negative items and users per row.

    Args:
        user_emb: ``[M, d]`` embeddings of ``users``.
        item_emb: ``[M, d]`` embeddings of ``items``.
        pool_item_emb: ``[M, P, d]`` embeddings of ``pool_items``.
        pool_user_emb: ``[M, P, d]`` embeddings of ``pool_users``.
            With a :class:`~hdccf_triton.ModulatedSimilarity` of size ``dim`` every embedding
            tensor carries the embedding and the modulation factor concatenated, d = 2·dim:
            ``user_emb [M, 2·dim] = [p_u ‖ e_u]``, ``item_emb [M, 2·dim] = [q_i ‖ e_i]``,
            ``pool_item_emb [M, P, 2·dim] = [q ‖ e]``, ``pool_user_emb [M, P, 2·dim] = [p ‖ e]``.
        users, items: ``[M]`` integer ids (int64).
        pool_items, pool_users: ``[M, P]`` integer ids (int64).
        interactions: the training pairs D (an :class:`InteractionIndex` on the embeddings'
            device): negatives observed with the anchor are removed as false negatives. With
            None only identity false negatives (the anchor's own item or user) are removed.
        temperature: τ > 0.
        omega_user, omega_item: ω_u, ω_i in [0, 1), the bias-correction probabilities.
        lambda_user, lambda_item: weights of the user–user and item–item terms.
        similarity: ``"dot"``, ``"cosine"``, or a :class:`~hdccf_triton.ModulatedSimilarity`
            (the neural modulated similarity of eqs. 7-8 for the user–item scores; the
            user–user and item–item terms use the dot, or cosine, of the p and q halves).
            Its parameters are not owned by this function: give ``similarity.parameters()``
            to the optimizer (:class:`DebiasedContrastiveLoss` registers it as a submodule).
        debias: False gives the biased in-batch loss (eqs. 1 and 5).
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (``[M]``).
        backend: ``"auto"`` (Triton on CUDA tensors, the PyTorch reference elsewhere),
            ``"torch"`` or ``"triton"``.
        gather_across_ranks: under an initialised ``torch.distributed`` process group, each
            rank scores its M rows against the pools of all W ranks (Q = P·(M·W − 1)
            negatives per row; see :mod:`hdccf_triton.distributed`).
        item_log_q, user_log_q: the sampling-bias correction (logQ): ``[num_items]`` and
            ``[num_users]`` tables of ℓ, the log sampling probability of each id as a negative
            (:meth:`~hdccf_triton.InBatchSampler.sampling_log_q` estimates them, relative to
            uniform sampling); every negative's score is lowered by its ℓ in the sums over
            negatives; the positive and the own blocks are not corrected
            (hdccf_triton/LOSS.md, "Sampling-bias correction"). Constants: no gradient. None
            (the default) is no correction; all zeros gives the same loss.
        extra_negatives: the mixed negatives (:class:`~hdccf_triton.ExtraNegatives`: B′ items
            and B′ users shared by every row, e.g. drawn uniformly by the sampler), extra
            negatives of the user–item term with the same false-negative test:
            Q = P·(M−1) + B′ there (hdccf_triton/LOSS.md, "Mixed negatives"). Not gathered
            across ranks.

    Returns:
        The loss: a scalar, or ``[M]`` with ``reduction="none"``; float32 for half-precision
        inputs, else the embeddings' dtype.
    """
    options = LossOptions(
        temperature=temperature,
        omega_user=omega_user,
        omega_item=omega_item,
        lambda_user=lambda_user,
        lambda_item=lambda_item,
        similarity=similarity,
        debias=debias,
        reduction=reduction,
        backend=backend,
        gather_across_ranks=gather_across_ranks,
    )
    tensors = (user_emb, item_emb, pool_item_emb, pool_user_emb, users, items, pool_items, pool_users)
    return compute_loss(tensors, interactions, options, extra_negatives=extra_negatives, item_log_q=item_log_q,
                        user_log_q=user_log_q)


def compute_loss(tensors: tuple, interactions: InteractionIndex | None, options: LossOptions, *,
                 extra_negatives: ExtraNegatives | None = None, item_log_q: torch.Tensor | None = None,
                 user_log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Validate, reduce the similarity, gather across ranks if asked, run one backend, reduce."""
    inputs = validate_inputs(tensors, interactions, options.similarity, options.temperature,
                             extra_negatives=extra_negatives, item_log_q=item_log_q, user_log_q=user_log_q)
    inputs, options = reduce_similarity(inputs, options)
    backend = select_backend(options.backend, inputs.user_emb.device, options.similarity)
    row_offset = 0
    if options.gather_across_ranks:
        from .distributed import gather_pools  # torch.distributed only when asked for

        inputs, row_offset = gather_pools(inputs)
    losses = backend.per_row_loss(inputs, interactions, options, row_offset)
    return reduce(losses, options.reduction)


def select_backend(name: str, device: torch.device, similarity: "Similarity | str" = "dot"):
    """The backend module for ``name`` (``"auto"``, ``"torch"``, ``"triton"``), tensors on
    ``device`` and a (reduced) ``similarity``: the reference for ``"torch"``, and for
    ``"auto"`` off CUDA (and for a modulated similarity whose dim the GPU kernels do not take,
    ``triton_modulated.fits_gpu``); else the Triton backend of the similarity's kernel family.
    Raises :class:`BackendUnavailableError` when ``"triton"`` cannot run there."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return reference  # without importing Triton: the CPU path of every training step
    similarity = as_similarity(similarity)
    kernel = similarity.kernel
    reason = unavailable_reason(device)
    if name == "triton":
        if reason is not None:
            raise BackendUnavailableError(f'backend="triton" cannot run: {reason}')
        return _TRITON_BACKENDS[kernel]
    if kernel == "modulated" and device.type == "cuda" and not triton_modulated.fits_gpu(similarity):
        return reference  # the modulated kernels' GPU tiles stop at dim 256 (launch_config)
    return _TRITON_BACKENDS[kernel] if reason is None else reference


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


class DebiasedContrastiveLoss(nn.Module):
    """The HDCCF loss as a module; see :func:`debiased_contrastive_loss` for the arguments.

    Options are validated once here. ``interactions`` follows the embeddings: the module moves
    it to their device on first use (and keeps that copy). ``item_log_q`` and ``user_log_q``
    (the sampling correction) may be given here once, as buffers that move with the module, or
    per call to ``forward`` (which then takes precedence). The similarity becomes the
    submodule ``similarity``: for a :class:`~hdccf_triton.ModulatedSimilarity`,
    ``loss_fn.parameters()`` (and those of a model that holds ``loss_fn``) include g's weight
    and bias, ``loss_fn.to(device)`` moves them and ``state_dict`` saves them.

    Example::

        loss_fn = DebiasedContrastiveLoss(index, temperature=0.1, omega_user=0.1)
        loss = loss_fn(user_emb, item_emb, pool_item_emb, pool_user_emb,
                       users, items, pool_items, pool_users)
    """

    def __init__(self, interactions: InteractionIndex | None = None, *, item_log_q: torch.Tensor | None = None,
                 user_log_q: torch.Tensor | None = None, **options):
        super().__init__()
        self.register_buffer("item_log_q", item_log_q, persistent=False)
        self.register_buffer("user_log_q", user_log_q, persistent=False)
        if interactions is not None and not isinstance(interactions, InteractionIndex):
            raise TypeError(
                f"interactions must be an InteractionIndex or None, got {type(interactions).__name__}"
            )
        self.interactions = interactions
        self.options = LossOptions(**options)
        self.similarity = self.options.similarity  # registered: its parameters are found

    def forward(
        self,
        user_emb: torch.Tensor,
        item_emb: torch.Tensor,
        pool_item_emb: torch.Tensor,
        pool_user_emb: torch.Tensor,
        users: torch.Tensor,
        items: torch.Tensor,
        pool_items: torch.Tensor,
        pool_users: torch.Tensor,
        *,
        extra_negatives: ExtraNegatives | None = None,
        item_log_q: torch.Tensor | None = None,
        user_log_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Shapes as in :func:`debiased_contrastive_loss`."""
        if self.interactions is not None and isinstance(user_emb, torch.Tensor):
            self.interactions = self.interactions.to(user_emb.device)
        tensors = (user_emb, item_emb, pool_item_emb, pool_user_emb, users, items, pool_items, pool_users)
        return compute_loss(
            tensors, self.interactions, self.options, extra_negatives=extra_negatives,
            item_log_q=item_log_q if item_log_q is not None else self.item_log_q,
            user_log_q=user_log_q if user_log_q is not None else self.user_log_q,
        )

    def extra_repr(self) -> str:
        o = self.options  # the similarity prints as the child module it is
        fields = ", ".join(f"{k}={getattr(o, k)!r}" for k in o.__dataclass_fields__ if k != "similarity")
        return f"interactions={self.interactions!r}, {fields}"
