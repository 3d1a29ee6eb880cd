"""HR@K and NDCG@K under the sampled and the full-ranking protocol.

One held-out item per evaluation instance (a held-out pair (u, i)). Its 0-based rank is
the number of candidates that beat it, and

    HR@K   = 1[rank < K]
    NDCG@K = 1 / log2(rank + 2)   if rank < K, else 0

(with one relevant item the ideal DCG is 1). Results are means over the held-out pairs
(one per user for a leave-one-out split).

Ties: a candidate with exactly the held-out score is placed before or after it at random,
uniformly, and the metrics are the *expected* values over that tie-breaking, computed
exactly (no random draw): with g candidates scoring higher and e scoring equal, the rank
is uniform on {g, ..., g+e}, so

    HR@K   = |{r in [g, g+e] : r < K}| / (e+1)
    NDCG@K = (1/(e+1)) · sum over r in [g, min(g+e, K-1)] of 1/log2(r+2).

A model that scores every item the same therefore gets HR@K = K/(n+1) with n competing
candidates (10/101 for HR@10 under the sampled protocol), not 1 and not 0.

Protocols (both always reported by :meth:`Evaluator.evaluate`):

``"sampled"``  the paper's protocol (He et al. 2017): the held-out item against
               ``num_negatives`` (100) items drawn uniformly, without replacement, among
               the items the user never interacted with (train, validation or test);
               drawn once per user with a seeded generator and cached, so every epoch
               and both splits see the same negatives.
``"full"``     the held-out item against every item (Krichene & Rendle, KDD 2020), the
               user's training items masked out, and at test time the validation items
               too; other held-out items of the same split are masked as well.

The model is reached through two callbacks: ``score(users [B], items [B, C]) -> [B, C]``
and ``score_all(users [B]) -> [B, num_items]``, called on chunks of at most
``batch_size`` held-out pairs, so the user x item matrix never exists whole.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from .interactions import check_pairs, csr_keys, csr_segments, pair_keys, sorted_contains, unique_csr

__all__ = ["Evaluator", "evaluate", "format_results", "metrics_from_counts", "ranking_metrics"]

PROTOCOLS = ("sampled", "full")
PROTOCOL_LABELS = {
    "sampled": "sampled (paper protocol: held-out item vs {n} sampled non-interacted items)",
    "full": "full (all items, training items masked; Krichene & Rendle 2020)",
}


# --------------------------------------------------------------------------- metric formulas


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks) if not isinstance(ks, int) else (ks,)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive ints, got {ks!r}")
    return ks


def metrics_from_counts(greater: torch.Tensor, equal: torch.Tensor,
                        ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Expected HR@K and NDCG@K per instance from its rank counts (ties broken uniformly).

    Args:
        greater: int64 ``[H]`` g, candidates scoring strictly higher than the held-out item.
        equal: int64 ``[H]`` e, candidates scoring exactly the same (not counting itself).
        ks: cut-offs K.

    Returns:
        ``{"HR@K": float64 [H], "NDCG@K": float64 [H], ...}`` in the order of ``ks``.
    """
    ks = _check_ks(ks)
    g, e = greater.to(torch.float64), equal.to(torch.float64)
    kmax = max(ks)
    ranks = torch.arange(kmax, dtype=torch.float64, device=g.device)
    # cum[t] = sum_{r < t} 1/log2(r+2): the NDCG of ranks g..g+e is a prefix-sum difference.
    cum = torch.zeros(kmax + 1, dtype=torch.float64, device=g.device)
    cum[1:] = torch.cumsum(1.0 / torch.log2(ranks + 2.0), 0)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hits = (k - g).clamp(min=0.0)
        hits = torch.minimum(hits, e + 1.0)
        lo = torch.clamp(g, max=float(k)).long()
        hi = torch.clamp(g + e + 1.0, max=float(k)).long()
        out[f"HR@{k}"] = hits / (e + 1.0)
        out[f"NDCG@{k}"] = (cum[hi] - cum[lo]) / (e + 1.0)
    return out


def _rank_counts(pos: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g and e of ``pos [H]`` against ``cand [H, C]``; NaN candidates are not candidates."""
    p = pos.unsqueeze(1)
    return (cand > p).sum(1), (cand == p).sum(1)


def ranking_metrics(pos_scores: torch.Tensor, cand_scores: torch.Tensor,
                    ks: Sequence[int] = (10,)) -> dict[str, torch.Tensor]:
    """Expected HR@K / NDCG@K of held-out scores against candidate scores.

    Args:
        pos_scores: ``[H]`` score of each held-out item.
        cand_scores: ``[H, C]`` scores of the competing candidates (the held-out item
            itself not included); NaN marks a column that is not a candidate.
        ks: cut-offs K.

    Returns:
        ``{"HR@K": float64 [H], "NDCG@K": float64 [H], ...}``.
    """
    if pos_scores.dim() != 1 or cand_scores.dim() != 2 or cand_scores.shape[0] != pos_scores.shape[0]:
        raise ValueError(f"pos_scores/cand_scores: expected [H] and [H, C], got "
                         f"{tuple(pos_scores.shape)} and {tuple(cand_scores.shape)}")
    if torch.isnan(pos_scores).any():
        raise ValueError("pos_scores: NaN score for a held-out item")
    return metrics_from_counts(*_rank_counts(pos_scores, cand_scores), ks)


# --------------------------------------------------------------------------- the evaluator


def _pairs(arg: str, pairs: Any, num_users: int, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    if pairs is None:
        e = torch.empty(0, dtype=torch.int64)
        return e, e
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        raise TypeError(f"{arg}: expected a pair (users [H], items [H]) of int64 tensors")
    users, items = pairs
    if isinstance(users, torch.Tensor) and users.numel() == 0:
        return users.long().cpu(), users.long().cpu()
    check_pairs(users, items, num_users, num_items, name=arg)
    return users.cpu(), items.cpu()


class Evaluator:
    """Leave-one-out evaluation of a scoring model, built once per data set split.

    Holds the masks (CSR of the interactions) and the cached sampled negatives.

    Args:
        num_users, num_items: id ranges.
        train_users, train_items: int64 ``[N]`` training pairs.
        valid, test: held-out pairs ``(users [H], items [H])`` (or None).
        num_negatives: sampled negatives per user (paper: 100).
        seed: seed of the sampled negatives (drawn on the CPU, so they do not depend on
            the device).
        device: where masks live and scores are compared; :meth:`evaluate` moves the
            evaluator to the device of an ``nn.Module`` model.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        train_users: torch.Tensor,
        train_items: torch.Tensor,
        valid: tuple[torch.Tensor, torch.Tensor] | None = None,
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        num_negatives: int = 100,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        for arg, v in (("num_users", num_users), ("num_items", num_items), ("num_negatives", num_negatives)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TypeError(f"{arg}: expected a positive int, got {v!r}")
        check_pairs(train_users, train_items, num_users, num_items, name="train_users/train_items")
        self.num_users, self.num_items = num_users, num_items
        self.num_negatives, self.seed = num_negatives, int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        tu, ti = train_users.cpu(), train_items.cpu()
        self.heldout = {"valid": _pairs("valid", valid, num_users, num_items),
                        "test": _pairs("test", test, num_users, num_items)}
        vu, vi = self.heldout["valid"]
        su, si = self.heldout["test"]
        # Masks of the full protocol: what is known at that stage and must not compete.
        self.masks = {
            "valid": unique_csr(torch.cat([tu, vu]), torch.cat([ti, vi]), num_users, num_items),
            "test": unique_csr(torch.cat([tu, vu, su]), torch.cat([ti, vi, si]), num_users, num_items),
        }
        self._negatives: torch.Tensor | None = None
        self.to(self.device)

    @classmethod
    def from_dataset(cls, dataset: Any, **kwargs: Any) -> "Evaluator":
        """An evaluator of a :class:`hdccf_triton.data.Dataset` (its valid and test splits)."""
        return cls(dataset.num_users, dataset.num_items, dataset.train_users, dataset.train_items,
                   dataset.heldout("valid"), dataset.heldout("test"), **kwargs)

    def to(self, device: torch.device | str) -> "Evaluator":
        """Move masks and negatives to ``device`` (returns self)."""
        self.device = torch.device(device)
        self.masks = {k: type(m)(*(t.to(self.device) for t in m)) for k, m in self.masks.items()}
        self.heldout = {k: (u.to(self.device), i.to(self.device)) for k, (u, i) in self.heldout.items()}
        if self._negatives is not None:
            self._negatives = self._negatives.to(self.device)
        return self

    # ----------------------------------------------------------------- sampled negatives

    @property
    def negatives(self) -> torch.Tensor:
        """int64 ``[num_users, num_negatives]``: each user's sampled negatives (-1 rows for
        users without held-out items). Drawn once, then cached."""
        if self._negatives is None:
            self._negatives = self._sample_negatives().to(self.device)
        return self._negatives

    def _sample_negatives(self) -> torch.Tensor:
        """Uniform samples without replacement among never-interacted items, per user.

        The first n distinct acceptable items of an i.i.d. uniform stream form a uniform
        n-subset, so: draw a stream per user, drop interacted items and repeats, keep the
        first n. Users too dense for the stream fall back to random keys over all items.
        """
        n, num_items = self.num_negatives, self.num_items
        known = self.masks["test"]  # train + valid + test: everything the user touched
        indptr, indices = known.indptr.cpu(), known.indices.cpu()
        users = torch.unique(torch.cat([self.heldout["valid"][0], self.heldout["test"][0]]).cpu())
        out = torch.full((self.num_users, n), -1, dtype=torch.int64)
        if users.numel() == 0:
            return out
        keys = csr_keys(indptr, indices, num_items)  # sorted and distinct: a unique CSR
        deg = indptr[1:] - indptr[:-1]
        short = users[num_items - deg[users] < n]
        if short.numel():
            u = int(short[0])
            raise ValueError(f"num_negatives: user {u} has only {num_items - int(deg[u])} items it never "
                             f"interacted with, fewer than num_negatives={n}")
        gen = torch.Generator().manual_seed(self.seed)
        width = 2 * n + 64
        draws = torch.randint(0, num_items, (users.numel(), width), generator=gen)
        touched = sorted_contains(keys, pair_keys(users.unsqueeze(1), draws, num_items))
        ok = _first_occurrence(draws) & ~touched
        rank = torch.cumsum(ok.long(), 1)
        done = rank[:, -1] >= n
        take = ok & (rank <= n) & done.unsqueeze(1)
        out[users[done]] = draws[take].view(-1, n)
        rest = users[~done]
        if rest.numel():  # dense users: exact random keys over every item
            r = torch.rand(rest.numel(), num_items, generator=gen)
            local, flat = csr_segments(indptr, rest)
            r[local, indices[flat]] = 2.0
            out[rest] = torch.topk(r, n, dim=1, largest=False).indices
        return out

    # ----------------------------------------------------------------- evaluation

    def evaluate(
        self,
        model: Any = None,
        split: str = "valid",
        ks: Sequence[int] = (10, 50),
        *,
        score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        score_all: Callable[[torch.Tensor], torch.Tensor] | None = None,
        protocols: Sequence[str] = PROTOCOLS,
        batch_size: int = 1024,
    ) -> dict[str, dict[str, float]]:
        """HR@K and NDCG@K of a model on ``split`` under each protocol.

        Args:
            model: an object with ``score(users [B], items [B, C]) -> [B, C]`` and/or
                ``score_all(users [B]) -> [B, num_items]`` (one is derived from the other
                when missing). The callbacks get int64 ids on the evaluator's device and
                return scores there; an ``nn.Module`` model moves the evaluator to the
                device of its parameters first.
            split: ``"valid"`` or ``"test"``.
            ks: cut-offs K.
            score, score_all: callbacks overriding the model's.
            protocols: subset of ``("sampled", "full")``.
            batch_size: held-out pairs scored per call; the results do not depend on it.

        Returns:
            ``{"sampled": {"HR@10": .., "NDCG@10": .., ...}, "full": {...}}``: means over
            the held-out pairs of ``split``.
        """
        ks = _check_ks(ks)
        if split not in self.heldout:
            raise ValueError(f"split: expected 'valid' or 'test', got {split!r}")
        bad = [p for p in protocols if p not in PROTOCOLS]
        if bad or not protocols:
            raise ValueError(f"protocols: expected a subset of {PROTOCOLS}, got {protocols!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        score, score_all = self._callbacks(model, score, score_all)
        users, items = self.heldout[split]
        if users.numel() == 0:
            raise ValueError(f"split: no held-out pairs in {split!r}")
        order = torch.argsort(users, stable=True)  # chunks of few distinct users
        users, items = users[order], items[order]
        results = {}
        with torch.no_grad():
            for protocol in protocols:
                counts = [self._counts(protocol, split, users[s:s + batch_size], items[s:s + batch_size],
                                       score, score_all) for s in range(0, users.numel(), batch_size)]
                g = torch.cat([c[0] for c in counts])
                e = torch.cat([c[1] for c in counts])
                per_pair = metrics_from_counts(g, e, ks)
                results[protocol] = {name: float(v.mean()) for name, v in per_pair.items()}
        return results

    def _callbacks(self, model: Any, score: Any, score_all: Any) -> tuple[Callable, Callable]:
        """Resolve the two callbacks; derive a missing one; follow an nn.Module's device."""
        score = score or getattr(model, "score", None)
        score_all = score_all or getattr(model, "score_all", None)
        if score is None and score_all is None:
            raise TypeError("model: needs a score(users, items) or score_all(users) method "
                            "(or pass score=/score_all=)")
        if isinstance(model, torch.nn.Module):
            param = next(iter(model.parameters()), None)
            if param is not None and param.device != self.device:
                self.to(param.device)
        if score_all is None:
            all_items = torch.arange(self.num_items, device=self.device)

            def score_all(u: torch.Tensor) -> torch.Tensor:
                return score(u, all_items.expand(u.numel(), -1))
        if score is None:
            def score(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                return torch.gather(score_all(u), 1, c)
        return score, score_all

    def _counts(self, protocol: str, split: str, users: torch.Tensor, items: torch.Tensor,
                score: Callable, score_all: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, e) per held-out pair of one chunk."""
        if protocol == "sampled":
            negs = self.negatives[users]
            cand = torch.cat([items.unsqueeze(1), negs], 1)
            s = _as_scores(score(users, cand), (users.numel(), cand.shape[1]), "score")
            return _rank_counts(s[:, 0], s[:, 1:])
        uniq, inv = torch.unique_consecutive(users, return_inverse=True)
        s = _as_scores(score_all(uniq), (uniq.numel(), self.num_items), "score_all").contiguous()
        flat_scores = s.view(-1)
        pos = flat_scores.index_select(0, inv * self.num_items + items)
        rows = s if uniq.numel() == users.numel() else s.index_select(0, inv)
        greater, equal = _rank_counts(pos, rows)
        # Take the masked items back out (they include the held-out item itself, so its tie
        # with itself goes too): compare them one by one rather than copy and mask the rows.
        mask = self.masks[split]
        local, flat = csr_segments(mask.indptr, users)
        masked = flat_scores.index_select(0, inv.index_select(0, local) * self.num_items
                                          + mask.indices.index_select(0, flat))
        p = pos.index_select(0, local)
        greater = greater.index_add(0, local, (masked > p).long(), alpha=-1)
        equal = equal.index_add(0, local, (masked == p).long(), alpha=-1)
        return greater, equal


def _as_scores(s: Any, shape: tuple[int, int], name: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"{name}: model returned {got}, expected a tensor of shape {shape}")
    if not s.dtype.is_floating_point:
        s = s.float()
    # A finite sum proves there is no NaN; only otherwise look element by element.
    if not torch.isfinite(s.sum()) and torch.isnan(s).any():
        raise ValueError(f"{name}: model returned NaN scores")
    return s


def _first_occurrence(draws: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` bool: True where the value did not occur earlier in its row."""
    vals, idx = torch.sort(draws, dim=1, stable=True)
    later = torch.zeros_like(draws, dtype=torch.bool)
    later[:, 1:] = vals[:, 1:] == vals[:, :-1]
    first = torch.empty_like(later)
    first.scatter_(1, idx, ~later)
    return first


# --------------------------------------------------------------------------- convenience


def evaluate(model: Any, data: Any, split: str = "valid", ks: Sequence[int] = (10, 50),
             **kwargs: Any) -> dict[str, dict[str, float]]:
    """HR@K / NDCG@K of ``model`` on ``data`` (a Dataset or an :class:`Evaluator`).

    With a Dataset a fresh Evaluator is built (its negatives are seeded, so repeated calls
    agree); keep an Evaluator to avoid rebuilding masks every epoch. Keyword arguments go
    to :meth:`Evaluator.evaluate` (score, score_all, protocols, batch_size) or, with a
    Dataset, to the Evaluator (num_negatives, seed, device).
    """
    if not isinstance(data, Evaluator):
        init = {k: kwargs.pop(k) for k in ("num_negatives", "seed", "device") if k in kwargs}
        data = Evaluator.from_dataset(data, **init)
    return data.evaluate(model, split, ks, **kwargs)


def format_results(results: dict[str, dict[str, float]], num_negatives: int = 100) -> str:
    """The results of :meth:`Evaluator.evaluate` as labelled lines."""
    lines = []
    for protocol, metrics in results.items():
        label = PROTOCOL_LABELS.get(protocol, protocol).format(n=num_negatives)
        body = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        lines.append(f"{label}:\n  {body}")
    return "\n".join(lines)
