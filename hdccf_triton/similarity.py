"""The similarities f of the loss, behind one small protocol: :class:`Dot`, :class:`Cosine`
and the neural modulated similarity :class:`ModulatedSimilarity` (eqs. 7-8 of the paper).

A :class:`Similarity` knows everything that depends on which f is used, so the loss, the
backends and the models never ask which one they hold:

* ``kernel``: the Triton kernel family that computes it (``"dot"`` or ``"modulated"``);
  ``normalize``: whether f is a cosine;
* :meth:`~Similarity.width`: the entries of an embedding row for a given ``dim``;
  :meth:`~Similarity.check_inputs`: the layout checks of the loss's embeddings;
* :meth:`~Similarity.reduce`: the simplest equal similarity (the all-ones modulation is the
  dot, or cosine, of the embedding halves);
* :meth:`~Similarity.own_scores` and :meth:`~Similarity.negative_scorer`: the scores the
  PyTorch reference computes (hdccf_triton/LOSS.md, "Scores");
* :meth:`~Similarity.pair_scores` and :meth:`~Similarity.score_matrix`: scoring for ranking.

``"dot"`` and ``"cosine"`` are accepted wherever a similarity is (:func:`as_similarity`).

The modulated similarity::

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

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Similarity", "Dot", "Cosine", "ModulatedSimilarity", "Modulated", "as_similarity", "ModulationParts",
    "modulated_scores", "modulated_score_matrix", "NORM_EPS",
]

#: Lower clamp of the norms under cosine similarities (as ``F.normalize``).
NORM_EPS = 1e-12

#: (rows, columns, inv_tau) ↦ the A, B, C, E score blocks ``[R, N·P]`` (see :meth:`Similarity.negative_scorer`)
Scorer = Callable[[tuple, tuple, float], tuple]


class Similarity(nn.Module):
    """The protocol every similarity of the loss follows (see the module docstring).

    Attributes:
        kernel: the Triton kernel family that computes the loss with it: ``"dot"`` or
            ``"modulated"``.
        normalize: f is a cosine (scores in [−1, 1]).
        pair_cost: entries of the reference's working set per (row, column) pair of a chunk.
        bilinear: the negative scores are the plain dot products of the embeddings as
            :meth:`own_scores` returns them (A = UXᵀ/τ, …): the reference then computes them
            with its fused bilinear path instead of :meth:`negative_scorer`.
    """

    kernel: str = "dot"
    normalize: bool = False
    pair_cost: int = 1
    bilinear: bool = False

    def width(self, dim: int) -> int:
        """Entries of one embedding row when the embeddings have ``dim`` dimensions."""
        return dim

    def check_inputs(self, d: int, device: torch.device) -> None:
        """Raise ValueError/TypeError unless embeddings of last dimension ``d`` on ``device`` fit."""

    def reduce(self, embeddings: tuple) -> tuple["Similarity", tuple]:
        """The simplest similarity equal to this one, and the embeddings it reads."""
        return self, embeddings

    def prepared(self, e: torch.Tensor) -> torch.Tensor:
        """Rows ``[.., d]`` as :meth:`own_scores` returns the pools (the mixed negatives are
        prepared with it): as given, normalised for a cosine."""
        return e

    def own_scores(self, U, I, X, Y, inv_tau: float, row_offset: int) -> tuple:
        """The embeddings as the reference scores them, the positives and the own blocks.

        Args:
            U, I: ``[M, d]``; X, Y: ``[N, P, d]`` pools (at least float32); row k's own block
                is pool block ``row_offset + k``.

        Returns:
            ``(U, I, X, Y, s [M], own_A, own_B, own_C, own_E [M, P])``, scores divided by τ.
        """
        raise NotImplementedError

    def negative_scorer(self, U, I, X, Y) -> tuple[tuple, tuple, Scorer]:
        """Row operands, column operands and the function scoring a chunk of rows against
        every pool column: ``scorer(rows[r0:r1], cols, inv_tau) -> (A, B, C, E)`` ``[R, N·P]``.

        Args:
            U, I: ``[M, d]``; X, Y: ``[N·P, d]``, as :meth:`own_scores` returned them.
        """
        raise NotImplementedError

    def pair_scores(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """f for broadcasting ``[..., width]`` user and item rows → ``[...]``."""
        raise NotImplementedError

    def score_matrix(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """f of ``[U, width]`` users against ``[I, width]`` items → ``[U, I]`` (for ranking)."""
        raise NotImplementedError


class Dot(Similarity):
    """f(u, i) = p_u · q_i."""

    bilinear = True

    def own_scores(self, U, I, X, Y, inv_tau, row_offset):
        own_X = X[row_offset : row_offset + U.shape[0]]  # [M, P, d]
        own_Y = Y[row_offset : row_offset + U.shape[0]]  # [M, P, d]
        return (
            U, I, X, Y,
            (U * I).sum(-1) * inv_tau,  # s
            torch.einsum("kpd,kd->kp", own_X, U) * inv_tau,  # own_A: f(u_k, X_own)
            torch.einsum("kpd,kd->kp", own_Y, I) * inv_tau,  # own_B: f(Y_own, i_k)
            torch.einsum("kpd,kd->kp", own_Y, U) * inv_tau,  # own_C: f(u_k, Y_own)
            torch.einsum("kpd,kd->kp", own_X, I) * inv_tau,  # own_E: f(i_k, X_own)
        )

    def negative_scorer(self, U, I, X, Y):
        return (U, I), (X, Y), _dot_blocks

    def pair_scores(self, user_emb, item_emb):
        return (user_emb * item_emb).sum(-1)

    def score_matrix(self, user_emb, item_emb):
        return user_emb @ item_emb.T

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class Cosine(Dot):
    """f(u, i) = p_u · q_i / (‖p_u‖ ‖q_i‖), norms clamped below at 1e-12."""

    normalize = True

    def prepared(self, e):
        return F.normalize(e, dim=-1, eps=NORM_EPS)

    def own_scores(self, U, I, X, Y, inv_tau, row_offset):
        U, I, X, Y = (self.prepared(t) for t in (U, I, X, Y))
        return super().own_scores(U, I, X, Y, inv_tau, row_offset)

    def pair_scores(self, user_emb, item_emb):
        return super().pair_scores(F.normalize(user_emb, dim=-1), F.normalize(item_emb, dim=-1))

    def score_matrix(self, user_emb, item_emb):
        return super().score_matrix(F.normalize(user_emb, dim=-1), F.normalize(item_emb, dim=-1))


def _dot_blocks(rows, cols, inv_tau):
    """A, B, C, E ``[R, N·P]`` of the dot product of (cosine-normalised) embeddings."""
    (U, I), (X, Y) = rows, cols
    A = U @ X.T * inv_tau  # [R, NP]
    B = I @ Y.T * inv_tau  # [R, NP]  (B[k, j] = f(Y_j, i_k))
    C = U @ Y.T * inv_tau  # [R, NP]
    E = I @ X.T * inv_tau  # [R, NP]
    return A, B, C, E


_NAMED = {"dot": Dot, "cosine": Cosine}


def as_similarity(value) -> Similarity:
    """``"dot"``, ``"cosine"`` or a :class:`Similarity` → a :class:`Similarity`.

    Raises:
        TypeError: neither a string nor a Similarity; ValueError: an unknown name.
    """
    if isinstance(value, Similarity):
        return value
    names = ", ".join(map(repr, _NAMED))
    if not isinstance(value, str):
        raise TypeError(f"similarity must be one of {names} or a ModulatedSimilarity, got {type(value).__name__}")
    if value not in _NAMED:
        raise ValueError(f"similarity must be one of {names}; got {value!r}")
    return _NAMED[value]()


class ModulationParts(NamedTuple):
    """g's weight and bias split by the block of the input they multiply, in one dtype.

    W_item, W_user, W_pair: ``[d, d]`` (W₁, W₂, W₃: the columns of W applied to e_i, e_u and
    e_i⊙e_u); bias: ``[d]``.
    """

    W_item: torch.Tensor
    W_user: torch.Tensor
    W_pair: torch.Tensor
    bias: torch.Tensor


class ModulatedSimilarity(Similarity):
    """f(u, i) = Σ_c m_c² p_c q_c with m = sigmoid(g([e_i ; e_u ; e_i ⊙ e_u])) (eqs. 7-8).

    Pass it as ``similarity=`` to :func:`~hdccf_triton.debiased_contrastive_loss` or
    :class:`~hdccf_triton.DebiasedContrastiveLoss`; the four embedding tensors of the loss
    then end in ``2·dim`` entries: ``user_emb [M, 2·dim] = [p_u ‖ e_u]``,
    ``item_emb [M, 2·dim] = [q_i ‖ e_i]``, ``pool_item_emb [M, P, 2·dim] = [q ‖ e]`` of the
    pool items, ``pool_user_emb [M, P, 2·dim] = [p ‖ e]`` of the pool users. The user–user
    and item–item terms compare the p halves (q halves) with the plain dot product (cosine
    with ``normalize=True``), as hdccf_triton/LOSS.md ("Scores") decides.

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

    kernel = "modulated"

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
        # the reference's chunks hold a few [rows, N·P, dim] modulation tensors
        self.pair_cost = 2 * dim
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
        tensors → ``[...]`` (no temperature), eq. 8 literally. For scoring and evaluation,
        e.g. users ``[U, 1, 2d]`` against items ``[1, I, 2d]`` (memory ~ 4·U·I·d entries)."""
        p, e_u = self.split(user_emb)
        q, e_i = self.split(item_emb)
        m = self.modulation(e_u, e_i)
        mp, mq = m * p, m * q
        if self.normalize:
            mp = F.normalize(mp, dim=-1, eps=NORM_EPS)
            mq = F.normalize(mq, dim=-1, eps=NORM_EPS)
        return (mp * mq).sum(-1)

    # -- the protocol ---------------------------------------------------------------------

    def width(self, dim: int) -> int:
        if dim != self.dim:
            raise ValueError(f"similarity.dim = {self.dim} must equal dim = {dim}")
        return 2 * dim

    def check_inputs(self, d: int, device: torch.device) -> None:
        """The embeddings end in [vector ‖ factor] of 2·dim entries; g lives on their device."""
        if d != 2 * self.dim:
            raise ValueError(
                f"with similarity=ModulatedSimilarity(dim={self.dim}) every embedding tensor ends in "
                f"2·dim = {2 * self.dim} entries (user_emb [M, 2·dim] = [p_u ‖ e_u], item_emb "
                f"[M, 2·dim] = [q_i ‖ e_i], pools [M, P, 2·dim]); got a last dimension of {d}"
            )
        for name, param in self.named_parameters():
            if not param.dtype.is_floating_point:
                raise TypeError(f"similarity.{name} must be floating-point, got dtype {param.dtype}")
            if param.device != device:
                raise ValueError(
                    f"similarity.{name} is on {param.device} but the embeddings are on {device}: "
                    f"move the ModulatedSimilarity with .to({str(device)!r})"
                )

    def reduce(self, embeddings: tuple) -> tuple[Similarity, tuple]:
        """The all-ones modulation as what it is: the p/q halves with :class:`Dot`
        (:class:`Cosine`). With m ≡ 1, f(u, i) = p_u·q_i, so the loss is the dot loss of the
        halves, computed by the same code: equal to the bit, and the factor halves get zero
        gradients. A genuine modulation is returned as it is."""
        if self.modulate:
            return self, embeddings
        # contiguous, as plain inputs would be: the same kernels, the same rounding
        halves = tuple(self.split(t)[0].contiguous() for t in embeddings)
        return (Cosine() if self.normalize else Dot()), halves

    def own_scores(self, U, I, X, Y, inv_tau, row_offset):
        """s, A, B modulated (eqs. 7-8); C, E the dot (cosine with ``normalize``) of the p
        halves and of the q halves. U, I, X, Y are returned as given (``[.., 2·dim]``)."""
        if not self.modulate:
            raise ValueError("the all-ones modulation must be reduced first (ModulatedSimilarity.reduce)")
        parts = self.parts(U.dtype)
        (p_u, e_u), (q_i, e_i) = self.split(U), self.split(I)
        rows = slice(row_offset, row_offset + U.shape[0])
        (q_x, e_x), (p_y, e_y) = self.split(X[rows]), self.split(Y[rows])  # own blocks [M, P, dim]
        c_u, c_i, c_x, c_y = self._aux_halves(p_u, q_i, q_x, p_y)
        row = lambda t: t[:, None, :]  # noqa: E731  [M, 1, dim] against the own block [M, P, dim]
        norm = self.normalize
        return (
            U, I, X, Y,
            modulated_scores(parts, p_u, e_u, q_i, e_i, norm) * inv_tau,  # s
            modulated_scores(parts, row(p_u), row(e_u), q_x, e_x, norm) * inv_tau,  # own_A
            modulated_scores(parts, p_y, e_y, row(q_i), row(e_i), norm) * inv_tau,  # own_B
            torch.einsum("kpd,kd->kp", c_y, c_u) * inv_tau,  # own_C: f_uu(u_k, Y_own)
            torch.einsum("kpd,kd->kp", c_x, c_i) * inv_tau,  # own_E: f_ii(i_k, X_own)
        )

    def negative_scorer(self, U, I, X, Y):
        """Rows (p_u, e_u, q_i, e_i, c_u, c_i) and columns (q_x, e_x, p_y, e_y, c_x, c_y), c
        the p/q halves as f_uu and f_ii see them; the chunk's modulation is an
        [R, N·P, dim] tensor (the reference's chunk size bounds it)."""
        (p_u, e_u), (q_i, e_i), (q_x, e_x), (p_y, e_y) = (self.split(t) for t in (U, I, X, Y))
        c_u, c_i, c_x, c_y = self._aux_halves(p_u, q_i, q_x, p_y)
        parts, norm = self.parts(U.dtype), self.normalize

        def scorer(rows, cols, inv_tau):
            (p_u, e_u, q_i, e_i, c_u, c_i), (q_x, e_x, p_y, e_y, c_x, c_y) = rows, cols
            r, c = (lambda t: t[:, None, :]), (lambda t: t[None, :, :])  # noqa: E731
            A = modulated_scores(parts, r(p_u), r(e_u), c(q_x), c(e_x), norm) * inv_tau  # f(u_k, X_j)
            B = modulated_scores(parts, c(p_y), c(e_y), r(q_i), r(e_i), norm) * inv_tau  # f(Y_j, i_k)
            C = c_u @ c_y.T * inv_tau  # f_uu(u_k, Y_j)
            E = c_i @ c_x.T * inv_tau  # f_ii(i_k, X_j)
            return A, B, C, E

        return (p_u, e_u, q_i, e_i, c_u, c_i), (q_x, e_x, p_y, e_y, c_x, c_y), scorer

    def _aux_halves(self, *halves):
        """The p/q halves as f_uu and f_ii compare them (normalised with ``normalize``)."""
        if self.normalize:
            return tuple(F.normalize(t, dim=-1, eps=NORM_EPS) for t in halves)
        return halves

    def pair_scores(self, user_emb, item_emb):
        if not self.modulate:
            return self(user_emb, item_emb)
        (p, e_user), (q, e_item) = self.split(user_emb), self.split(item_emb)
        return modulated_scores(self.parts(user_emb.dtype), p, e_user, q, e_item, self.normalize)

    def score_matrix(self, user_emb, item_emb):
        (p, e_user), (q, e_item) = self.split(user_emb), self.split(item_emb)
        if self.modulate:
            return modulated_score_matrix(self.parts(user_emb.dtype), p, e_user, q, e_item, self.normalize)
        return self.reduce(())[0].score_matrix(p, q)  # the dot (cosine) of the halves

    def extra_repr(self) -> str:
        return f"dim={self.dim}, normalize={self.normalize}, modulate={self.modulate}"


#: The name the layout uses: ``Dot``, ``Cosine``, ``Modulated``.
Modulated = ModulatedSimilarity


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

