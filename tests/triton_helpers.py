"""Batches and comparisons for the Triton backend tests (interpreter and GPU).

Kept apart from the other test helpers so that the Triton tests depend only on the library.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest

import torch

from hdccf_triton import InteractionIndex
from hdccf_triton.backends._triton_runtime import LaunchOverrides
from hdccf_triton.terms import LossInputs


@dataclass
class Case:
    """Loss inputs for M rows whose own blocks are ``row_offset ..`` of N ≥ M pool blocks."""

    embeddings: list  # user [M, d], item [M, d], pool items [N, P, d], pool users [N, P, d]
    ids: list  # users [M], items [M], pool_items [N, P], pool_users [N, P]
    index: InteractionIndex
    row_offset: int = 0

    @property
    def M(self) -> int:
        return self.embeddings[0].shape[0]

    def cast(self, dtype) -> "Case":
        return Case([e.to(dtype) for e in self.embeddings], self.ids, self.index, self.row_offset)


def make_case(M, P, d, *, N=None, row_offset=0, seed=0, scale=0.5, dtype=torch.float64,
              num_users=7, num_items=9, density=0.3, device="cpu") -> Case:
    """Random embeddings N(0, scale²) and ids from small ranges, so false negatives abound.

    D holds each observed pair (users[k], items[k]) and a ``density`` fraction of all pairs.
    """
    N = M if N is None else N
    assert 0 <= row_offset <= N - M
    g = torch.Generator().manual_seed(seed)

    def emb(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    users = torch.randint(0, num_users, (N,), generator=g)
    items = torch.randint(0, num_items, (N,), generator=g)
    pool_items = torch.randint(0, num_items, (N, P), generator=g)
    pool_users = torch.randint(0, num_users, (N, P), generator=g)
    keep = torch.rand(num_users, num_items, generator=g) < density
    keep[users, items] = True
    pu, pi = keep.nonzero(as_tuple=True)
    index = InteractionIndex.from_pairs(pu, pi, num_users, num_items).to(device)
    rows = slice(row_offset, row_offset + M)
    embeddings = [emb(N, d)[rows], emb(N, d)[rows], emb(N, P, d), emb(N, P, d)]
    ids = [t.to(device) for t in (users[rows], items[rows], pool_items, pool_users)]
    return Case(embeddings, ids, index, row_offset)


def all_false_negative_case(P=2, d=8, *, dtype=torch.float64, seed=3) -> Case:
    """M = 5 rows where row 0 has no true negative at all, and row 1 no true negative item.

    User 0 saw every item and every user saw item 0, so for row 0 = (user 0, item 0) every
    pool item and every pool user is a false negative; user 1 saw every item too.
    """
    num_users, num_items, M = 6, 8, 5
    g = torch.Generator().manual_seed(seed)
    users = torch.tensor([0, 1, 2, 3, 4])
    items = torch.tensor([0, 3, 4, 5, 6])
    pool_items = torch.randint(1, num_items, (M, P), generator=g)
    pool_users = torch.randint(1, num_users, (M, P), generator=g)
    pairs = {(0, i) for i in range(num_items)} | {(1, i) for i in range(num_items)}
    pairs |= {(u, 0) for u in range(num_users)} | set(zip(users.tolist(), items.tolist()))
    pu, pi = zip(*sorted(pairs))
    index = InteractionIndex.from_pairs(pu, pi, num_users, num_items)
    emb = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.7).to(dtype)  # noqa: E731
    return Case([emb(M, d), emb(M, d), emb(M, P, d), emb(M, P, d)],
                [users, items, pool_items, pool_users], index)


class Kernels:
    """A Triton backend module called with explicit :class:`LaunchOverrides`: every output
    buffer NaN-poisoned, plus the given tiles, splits or index mode."""

    def __init__(self, module, **overrides):
        self.module = module
        self.overrides = LaunchOverrides(poison_outputs=True, **overrides)

    def __getattr__(self, name):  # per_row_loss, negative_statistics, fused_scores
        return functools.partial(getattr(self.module, name), overrides=self.overrides)


def inputs_of(case: Case, embeddings=None) -> LossInputs:
    """The case's LossInputs (with other embeddings if given)."""
    return LossInputs(*(case.embeddings if embeddings is None else embeddings), *case.ids)


def loss_and_grads(backend, case: Case, options, upstream=None, *, index="case"):
    """``backend.per_row_loss`` on fresh leaves, and the gradients of Σ upstream·loss."""
    leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    interactions = case.index if index == "case" else index
    loss = backend.per_row_loss(inputs_of(case, leaves), interactions, options, case.row_offset)
    if upstream is None:
        upstream = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return loss.detach(), grads


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64, treating equal infinities as equal."""
    a, b = a.double(), b.double()
    same = (a == b)
    return float(torch.where(same, torch.zeros_like(a), (a - b).abs()).max()) if a.numel() else 0.0


def assert_error_within_factor(got, ref_low, truth, *, factor=4.0, atol=0.0, what=""):
    """CCE-style check: |got − truth| ≤ factor·|ref_low − truth| + atol (max over elements).

    ``ref_low`` is the reference backend at the precision of ``got``; ``truth`` the float64
    reference. The kernel may round differently, not worse than a small factor.
    """
    err_got = max_abs(got, truth)
    err_ref = max_abs(ref_low, truth)
    assert err_got <= factor * err_ref + atol, (
        f"{what}: kernel error {err_got:.3g} > {factor}·reference error {err_ref:.3g} + {atol:.3g}"
    )


def use_triton_mode(request, monkeypatch) -> None:
    """The Triton tests' setting: the interpreter on CPU tensors, or the real GPU for tests
    marked ``gpu`` (skipped without CUDA)."""
    if request.node.get_closest_marker("gpu"):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
