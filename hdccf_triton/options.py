"""The loss's options in one small, validated, immutable dataclass shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .similarity import Similarity, as_similarity

__all__ = ["LossOptions", "REDUCTIONS", "BACKENDS"]

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """Everything that selects *which* function of hdccf_triton/LOSS.md is computed, and how.

    Attributes:
        temperature: τ > 0; scores are similarities divided by τ.
        omega_user, omega_item: ω_u, ω_i in [0, 1), the false-negative probabilities of the
            bias correction (eq. 25). Ignored when ``debias`` is False.
        lambda_user, lambda_item: λ_u, λ_i ≥ 0, weights of the user–user and item–item terms.
        similarity: a :class:`~hdccf_triton.similarity.Similarity`: ``"dot"`` and ``"cosine"``
            are accepted and stored as ``Dot()`` and ``Cosine()``; a
            :class:`~hdccf_triton.ModulatedSimilarity` (eqs. 7-8) makes the embeddings end in
            ``2·dim`` entries (see its docstring).
        debias: remove false negatives and apply the ω correction and floor (eqs. 14-17);
            False gives the biased loss of eqs. 1 and 5.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the per-row vector ``[M]``).
        backend: ``"auto"`` (Triton on CUDA tensors, else the reference), ``"torch"`` or
            ``"triton"``.
        gather_across_ranks: under an initialised ``torch.distributed`` process group, score
            the local rows against the pools of every rank (see :mod:`hdccf_triton.distributed`).
    """

    temperature: float = 0.1
    omega_user: float = 0.0
    omega_item: float = 0.0
    lambda_user: float = 1.0
    lambda_item: float = 1.0
    similarity: "str | Similarity" = "dot"
    debias: bool = True
    reduction: str = "mean"
    backend: str = "auto"
    gather_across_ranks: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        tau = _real("temperature", self.temperature)
        if tau <= 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
        set_("temperature", tau)
        for name in ("omega_user", "omega_item"):
            w = _real(name, getattr(self, name))
            if not 0.0 <= w < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {w}")
            set_(name, w)
        for name in ("lambda_user", "lambda_item"):
            lam = _real(name, getattr(self, name))
            if lam < 0:
                raise ValueError(f"{name} must be >= 0, got {lam}")
            set_(name, lam)
        for name in ("debias", "gather_across_ranks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        set_("similarity", as_similarity(self.similarity))
        for name, allowed in (("reduction", REDUCTIONS), ("backend", BACKENDS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")

    def with_similarity(self, similarity: Similarity) -> "LossOptions":
        """These options with another similarity."""
        return replace(self, similarity=similarity)
