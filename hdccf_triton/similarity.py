"""The neural modulated similarity of HDCCF (eqs. 7-8 of the paper).

    m_ui   = sigmoid( g([e_i ; e_u ; e_i ⊙ e_u]) )        g = nn.Linear(3d, d)        (8)
    f(u,i) = (m_ui ⊙ p_u) · (m_ui ⊙ q_i) = Σ_c m_c² p_c q_c                          (7)

Each user carries two vectors: its embedding p_u and its modulation factor e_u (q_i and e_i
for an item), both of ``dim`` entries. The loss receives them **concatenated along the last
dimension**: a user tensor ends in ``2·dim`` entries ``[p_u ‖ e_u]``, an item tensor in
``[q_i ‖ e_i]`` (:meth:`ModulatedSimilarity.split` takes them apart). ``normalize=True`` makes
f the cosine of the modulated vectors m⊙p and m⊙q (each norm clamped below at 1e-12), so
scores lie in [−1, 1].

Splitting g's weight W ∈ R^{d×3d} into its three column blocks, W·[e_i; e_u; e_i⊙e_u] + b =
W₁e_i + W₂e_u + b + W₃(e_i⊙e_u): only the last term depends on the *pair*; the first are
per-entity products computed once. The backends score the M × M·P in-batch pairs that way
(:meth:`ModulatedSimilarity.parts`), never forming the [pairs, 3d] concatenation.

The all-ones modulation of the paper's ablation (m ≡ 1, so f(u, i) = p_u·q_i) is
``ModulatedSimilarity.all_ones(dim)`` (or ``modulate=False``): it has no parameters, ignores
the e halves, and the loss it gives equals the ``"dot"`` loss of the p/q halves exactly (the
``"cosine"`` loss with ``normalize=True``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModulatedSimilarity", "ModulationParts", "modulated_scores", "modulated_score_matrix", "NORM_EPS"]

#: Lower clamp of the norms of m⊙p and m⊙q under ``normalize=True`` (as ``F.normalize``).
NORM_EPS = 1e-12


class ModulationParts(NamedTuple):
    """g's weight and bias split by the block of the input they multiply, in one dtype.

    W_item, W_user, W_pair: ``[d, d]`` (W₁, W₂, W₃: the columns of W applied to e_i, e_u and
    e_i⊙e_u); bias: ``[d]``.
    """

    W_item: torch.Tensor
    W_user: torch.Tensor
    W_pair: torch.Tensor
    bias: torch.Tensor


class ModulatedSimilarity(nn.Module):
    """f(u, i) = Σ_c m_c² p_c q_c with m = sigmoid(g([e_i ; e_u ; e_i ⊙ e_u])) (eqs. 7-8).

    Pass it as ``similarity=`` to :func:`~hdccf_triton.debiased_contrastive_loss` or
    :class:`~hdccf_triton.DebiasedContrastiveLoss`; the four embedding tensors of the loss
    then end in ``2·dim`` entries: ``user_emb [M, 2·dim] = [p_u ‖ e_u]``,
    ``item_emb [M, 2·dim] = [q_i ‖ e_i]``, ``pool_item_emb [M, P, 2·dim] = [q ‖ e]`` of the
    pool items, ``pool_user_emb [M, P, 2·dim] = [p ‖ e]`` of the pool users. The user–user
    and item–item terms compare the p halves (q halves) with the plain dot product (cosine
    with ``normalize=True``), as SPEC.md decides.

    Args:
        dim: d, the size of each of the two halves.
        normalize: f is the cosine of m⊙p and m⊙q (norms clamped at 1e-12), in [−1, 1].
        modulate: False gives the all-ones modulation m ≡ 1 (no parameters; see
            :meth:`all_ones`).

    Attributes:
        g: ``nn.Linear(3·dim, dim)`` (None without modulation). Its parameters belong to the
            model: :class:`~hdccf_triton.DebiasedContrastiveLoss` registers this module as its
            submodule ``similarity``, so ``loss_fn.parameters()`` includes them; with the
            functional API, give ``similarity.parameters()`` to the optimizer yourself.
    """

    def __init__(self, dim: int, normalize: bool = False, *, modulate: bool = True):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        for name, flag in (("normalize", normalize), ("modulate", modulate)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.dim = dim
        self.normalize = normalize
        self.modulate = modulate
        self.g = nn.Linear(3 * dim, dim) if modulate else None

    @classmethod
    def all_ones(cls, dim: int, normalize: bool = False) -> "ModulatedSimilarity":
        """The ablation with a fixed all-ones modulating vector: f(u, i) = p_u·q_i (cosine
        with ``normalize``). Inputs keep their ``2·dim`` layout; the e halves are ignored."""
        return cls(dim, normalize, modulate=False)

    def split(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., 2·dim]`` → (embedding ``[..., dim]``, modulation factor ``[..., dim]``)."""
        if emb.shape[-1] != 2 * self.dim:
            raise ValueError(
                f"expected a last dimension of 2·dim = {2 * self.dim} ([embedding ‖ factor]), "
                f"got {emb.shape[-1]}"
            )
        return emb[..., : self.dim], emb[..., self.dim :]

    def parts(self, dtype: torch.dtype) -> ModulationParts:
        """W₁, W₂, W₃ and b of g in ``dtype`` (differentiable casts). Needs ``modulate``."""
        if self.g is None:
            raise RuntimeError("the all-ones modulation has no parameters")
        d = self.dim
        W = self.g.weight.to(dtype)  # [d, 3d]
        return ModulationParts(W[:, :d], W[:, d : 2 * d], W[:, 2 * d :], self.g.bias.to(dtype))

    def modulation(self, e_user: torch.Tensor, e_item: torch.Tensor) -> torch.Tensor:
        """m = sigmoid(g([e_i ; e_u ; e_i ⊙ e_u])) (eq. 8), literally; broadcasting shapes
        ``[..., dim]`` → ``[..., dim]``. All ones without modulation."""
        e_user, e_item = torch.broadcast_tensors(e_user, e_item)
        if self.g is None:
            return torch.ones_like(e_user)
        return torch.sigmoid(self.g(torch.cat([e_item, e_user, e_item * e_user], dim=-1)))

    def forward(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """f(u, i) for broadcasting ``[..., 2·dim]`` user ``[p ‖ e]`` and item ``[q ‖ e]``
        tensors → ``[...]`` (no temperature). For scoring and evaluation, e.g. users
        ``[U, 1, 2d]`` against items ``[1, I, 2d]`` (memory ~ 4·U·I·d entries)."""
        p, e_u = self.split(user_emb)
        q, e_i = self.split(item_emb)
        m = self.modulation(e_u, e_i)
        mp, mq = m * p, m * q
        if self.normalize:
            mp = F.normalize(mp, dim=-1, eps=NORM_EPS)
            mq = F.normalize(mq, dim=-1, eps=NORM_EPS)
        return (mp * mq).sum(-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, normalize={self.normalize}, modulate={self.modulate}"


def modulated_scores(
    parts: ModulationParts,
    p: torch.Tensor,
    e_user: torch.Tensor,
    q: torch.Tensor,
    e_item: torch.Tensor,
    normalize: bool,
) -> torch.Tensor:
    """f(u, i) of broadcasting user (p, e_u) and item (q, e_i) halves ``[..., d]`` → ``[...]``.

    The split form of eq. 8: m = sigmoid(W₁e_i + W₂e_u + b + W₃(e_i⊙e_u)). The per-entity
    products W₁e_i and W₂e_u are taken on the un-broadcast operands, so for rows ``[R, 1, d]``
    against columns ``[1, C, d]`` only W₃(e_i⊙e_u) is an [R, C, d] × [d, d] product.
    """
    h = F.linear(e_item, parts.W_item) + F.linear(e_user, parts.W_user, parts.bias)
    m = torch.sigmoid(h + F.linear(e_item * e_user, parts.W_pair))  # [..., d]
    mp, mq = m * p, m * q  # eq. 7: (m ⊙ p)·(m ⊙ q)
    s = (mp * mq).sum(-1)
    if normalize:  # vector_norm's gradient is 0 (not NaN) at a zero vector
        s = s / (
            torch.linalg.vector_norm(mp, dim=-1).clamp_min(NORM_EPS)
            * torch.linalg.vector_norm(mq, dim=-1).clamp_min(NORM_EPS)
        )
    return s


@torch.no_grad()
def modulated_score_matrix(
    parts: ModulationParts,
    p: torch.Tensor,
    e_user: torch.Tensor,
    q: torch.Tensor,
    e_item: torch.Tensor,
    normalize: bool,
    *,
    max_elements: int = 1 << 22,
) -> torch.Tensor:
    """f(u, i) of every user against every item, for inference (no autograd).

    Args:
        parts: g's split weights (:meth:`ModulatedSimilarity.parts`), in the dtype of the halves.
        p, e_user: ``[U, d]`` user embeddings and modulation factors.
        q, e_item: ``[I, d]`` item embeddings and modulation factors.
        normalize: f is the cosine of m⊙p and m⊙q (each norm clamped below at 1e-12).
        max_elements: the working set, in entries: users are taken ``max_elements // (I·d)``
            rows at a time (at least one).

    Returns:
        ``[U, I]``: the values of :func:`modulated_scores` on ``[U, 1, d]`` × ``[1, I, d]``, up to
        rounding. Ranking every item for every user is the evaluator's full protocol, where the
        broadcast form spends most of its time creating and reading ``[U, I, d]`` temporaries;
        here one ``[rows, I, d]`` buffer per chunk is updated in place and reduced by batched
        matrix-vector products (about 5× faster on one CPU thread at ML-1M's size:
        ``python bench/evaluation_time.py --similarity modulated --threads 1``).
    """
    num_items, d = q.shape
    rows = max(1, max_elements // max(1, num_items * d))
    h_item = F.linear(e_item, parts.W_item)  # [I, d]
    h_user = F.linear(e_user, parts.W_user, parts.bias)  # [U, d]
    q_sq = q * q if normalize else None  # [I, d]
    out = q.new_empty(p.shape[0], num_items)  # [U, I]
    for start in range(0, p.shape[0], rows):
        o_rows = slice(start, start + rows)
        b_p = p[o_rows]  # [R, d]
        # z = m² = sigmoid(W₁e_i + W₂e_u + b + W₃(e_i⊙e_u))²
        b_z = F.linear(e_user[o_rows, None, :] * e_item[None], parts.W_pair)  # [R, I, d]
        b_z += h_item
        b_z += h_user[o_rows, None, :]
        b_z.sigmoid_().square_()
        if normalize:
            # |m⊙p|² = Σ_c z_c p_c², |m⊙q|² = Σ_c z_c q_c²
            norm_p = torch.bmm(b_z, (b_p * b_p)[:, :, None])[..., 0].sqrt_().clamp_min_(NORM_EPS)  # [R, I]
            norm_q = (b_z * q_sq).sum(-1).sqrt_().clamp_min_(NORM_EPS)  # [R, I]
        # f = Σ_c z_c q_c p_c  (eq. 7)
        b_z *= q
        b_s = torch.bmm(b_z, b_p[:, :, None])[..., 0]  # [R, I]
        if normalize:
            b_s /= norm_p * norm_q
        out[o_rows] = b_s
    return out

