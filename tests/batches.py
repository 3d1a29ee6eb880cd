"""Random batches for the loss tests: small id ranges, so that false negatives really occur."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hdccf_triton import InteractionIndex


@dataclass
class Batch:
    """The eight loss inputs plus the interaction index they were drawn against."""

    user_emb: torch.Tensor  # [M, d]
    item_emb: torch.Tensor  # [M, d]
    pool_item_emb: torch.Tensor  # [M, P, d]
    pool_user_emb: torch.Tensor  # [M, P, d]
    users: torch.Tensor  # [M]
    items: torch.Tensor  # [M]
    pool_items: torch.Tensor  # [M, P]
    pool_users: torch.Tensor  # [M, P]
    index: InteractionIndex
    pairs: list

    @property
    def tensors(self):
        return (
            self.user_emb, self.item_emb, self.pool_item_emb, self.pool_user_emb,
            self.users, self.items, self.pool_items, self.pool_users,
        )

    @property
    def embeddings(self):
        return self.tensors[:4]

    def with_embeddings(self, *embeddings):
        return (*embeddings, *self.tensors[4:])


def make_batch(M=6, P=2, d=4, *, dtype=torch.float64, seed=0, scale=0.3, num_users=7,
               num_items=9, density=0.3, requires_grad=False) -> Batch:
    """A batch of M rows whose ids collide often, with an index of random training pairs.

    Embedding entries are N(0, scale²), so scores ~ scale²·d/τ.
    """
    g = torch.Generator().manual_seed(seed)
    emb = lambda *shape: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    users = torch.randint(0, num_users, (M,), generator=g)
    items = torch.randint(0, num_items, (M,), generator=g)
    pool_items = torch.randint(0, num_items, (M, P), generator=g)
    pool_users = torch.randint(0, num_users, (M, P), generator=g)
    keep = torch.rand(num_users, num_items, generator=g) < density
    keep[users, items] = True  # the observed pairs are training pairs
    pu, pi = keep.nonzero(as_tuple=True)
    index = InteractionIndex.from_pairs(pu, pi, num_users, num_items)
    tensors = [emb(M, d), emb(M, d), emb(M, P, d), emb(M, P, d)]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return Batch(*tensors, users, items, pool_items, pool_users, index,
                 list(zip(pu.tolist(), pi.tolist())))
