"""Loss values and every gradient through the public API, saved to compare two versions bit for bit.

    python bench/api_snapshot.py save before.pt            # on the old commit
    python bench/api_snapshot.py save after.pt             # on the new one
    python bench/api_snapshot.py compare before.pt after.pt

A refactoring that claims to change no result runs this on both sides: every similarity
(dot, cosine, the modulated similarity and its all-ones ablation, each with and without
``normalize``), both backends (the Triton kernels in the interpreter, on CPU tensors), float64
and float32, debiased (ω = 0 and ω > 0) and biased, with the training pairs as a bitmap, as
sorted keys (an id space above 2³¹ pairs) or absent, ordinary and large scores, a
non-uniform upstream gradient, plus bf16 through the module form. It uses only the public API
(``debiased_contrastive_loss``, ``DebiasedContrastiveLoss``, ``InteractionIndex``,
``ModulatedSimilarity``), which every version has. About a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on CPU tensors

import torch  # noqa: E402

from hdccf_triton import (  # noqa: E402
    DebiasedContrastiveLoss, InteractionIndex, ModulatedSimilarity, debiased_contrastive_loss,
)

M, P, DIM = 7, 3, 6


def _case(width: int, seed: int, big_index: bool, scale: float):
    """Embeddings of width ``width``, ids from small ranges (false negatives abound), D, upstream."""
    g = torch.Generator().manual_seed(seed)
    emb = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    num_users, num_items = 7, 9
    ids = [torch.randint(0, num_users, (M,), generator=g), torch.randint(0, num_items, (M,), generator=g),
           torch.randint(0, num_items, (M, P), generator=g), torch.randint(0, num_users, (M, P), generator=g)]
    keep = torch.rand(num_users, num_items, generator=g) < 0.3
    keep[ids[0], ids[1]] = True
    pu, pi = keep.nonzero(as_tuple=True)
    ranges = (50000, 50000) if big_index else (num_users, num_items)  # above 2³¹ pairs: sorted keys
    index = InteractionIndex.from_pairs(pu, pi, *ranges)
    embeddings = [emb(M, width), emb(M, width), emb(M, P, width), emb(M, P, width)]
    upstream = torch.rand(M, generator=g, dtype=torch.float64) + 0.5
    return embeddings, ids, index, upstream


def _similarities():
    torch.manual_seed(1)
    sims = {"dot": ("dot", 1), "cosine": ("cosine", 1)}
    for norm in (False, True):
        sims[f"modulated_n{int(norm)}"] = (ModulatedSimilarity(DIM, normalize=norm).double(), 2)
        sims[f"all_ones_n{int(norm)}"] = (ModulatedSimilarity.all_ones(DIM, normalize=norm), 2)
    return sims


def snapshot() -> dict:
    """{case: [loss, gradients of the embeddings (and of g's parameters)]}."""
    results = {}
    for name, (sim, width) in _similarities().items():
        grid = itertools.product(("torch", "triton"), (torch.float64, torch.float32), (True, False), (0.0, 0.3),
                                 ("index", "none", "big"), (0.5, 8.0))
        for backend, dtype, debias, omega, index_kind, scale in grid:
            if not debias and (omega or index_kind != "index"):
                continue
            seed = zlib.crc32(repr((name, debias, index_kind)).encode()) % 1000
            embeddings, ids, index, upstream = _case(DIM * width, seed, index_kind == "big", scale)
            leaves = [e.to(dtype).requires_grad_() for e in embeddings]
            similarity = sim.to(dtype) if isinstance(sim, ModulatedSimilarity) else sim
            params = list(similarity.parameters()) if isinstance(similarity, ModulatedSimilarity) else []
            loss = debiased_contrastive_loss(
                *leaves, *ids, interactions=None if index_kind == "none" else index, temperature=0.3,
                omega_user=omega, omega_item=omega / 2, lambda_user=0.7, lambda_item=1.3, similarity=similarity,
                debias=debias, reduction="none", backend=backend)
            grads = torch.autograd.grad(loss, leaves + params, upstream.to(loss.dtype), allow_unused=True)
            key = (name, backend, str(dtype), debias, omega, index_kind, scale)
            results[key] = [loss.detach()] + [None if g is None else g.detach() for g in grads]
            if isinstance(sim, ModulatedSimilarity):
                sim.double()
    for name in ("dot", "cosine"):  # bf16 through the module form
        embeddings, ids, index, _ = _case(16, 5, False, 0.5)
        leaves = [e.to(torch.bfloat16).requires_grad_() for e in embeddings]
        loss = DebiasedContrastiveLoss(index, similarity=name, omega_user=0.2, backend="triton")(*leaves, *ids)
        results[(name, "triton-module", "bf16")] = [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, leaves)]
    return results


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num()))


def compare(before: dict, after: dict) -> int:
    """Print the cases that differ; the number of differing tensors."""
    if before.keys() != after.keys():
        print("the two snapshots hold different cases:", sorted(set(before) ^ set(after), key=repr))
        return -1
    tensors = differ = 0
    for key in before:
        for a, b in zip(before[key], after[key]):
            tensors += 1
            if not _equal(a, b):
                differ += 1
                print("differs:", key)
    print(f"{len(before)} cases, {tensors} tensors compared bit for bit, {differ} differ")
    return differ


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("save").add_argument("path")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = p.parse_args(argv)
    if args.command == "save":
        torch.save(snapshot(), args.path)
        print(f"saved to {args.path}")
        return 0
    return 0 if compare(torch.load(args.before), torch.load(args.after)) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
