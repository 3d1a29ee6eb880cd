"""Ranking metrics under three protocols, and the :class:`Evaluator` that computes them.

**Leave-one-out** (one held-out item per user, as the paper's ML-1M split). Its 0-based rank
is the number of candidates that beat it, and

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

``"sampled"``  the paper's protocol (He et al. 2017): the held-out item against
               ``num_negatives`` (100) items drawn uniformly, without replacement, among
               the items the user never interacted with (train, validation or test);
               drawn once per user with a seeded generator and cached, so every epoch
               and both splits see the same negatives.
``"full"``     the held-out item against every item (Krichene & Rendle, KDD 2020), the
               user's training items masked out, and at test time the validation items
               too.

**Given held-out sets** (any number of held-out items per user: the LightGCN/NGCF splits of
Gowalla, Yelp2018, Amazon-Book; RecBole's full-sort evaluation), protocol ``"per_user"``: for
every user with held-out items, rank every item the user has not interacted with in training
(at test time also the validation items), take the top K list L_u and the held-out set T_u:

    Recall@K    = |L_u ∩ T_u| / |T_u|
    Precision@K = |L_u ∩ T_u| / K
    HitRate@K   = 1[|L_u ∩ T_u| > 0]
    NDCG@K      = DCG / IDCG,  DCG = Σ_{r < K, L_u[r] ∈ T_u} 1/log2(r + 2),
                  IDCG = Σ_{r < min(|T_u|, K)} 1/log2(r + 2)

(binary relevance; LightGCN's ``RecallPrecision_ATk``/``NDCGatK_r`` and RecBole's
``Recall``/``NDCG``/``Precision``/``Hit``), averaged over the users with held-out items.
Ties: items with equal scores are ordered by item id, lower first, so L_u is deterministic
(:func:`top_k_items`); an item the model scores −inf is never retrieved. On leave-one-out
data (|T_u| = 1) Recall@K and HitRate@K equal HR@K of ``"full"`` up to ties.

The evaluator picks the protocols from the data (:attr:`Evaluator.heldout_kind`): ``("sampled",
"full")`` when every user holds out at most one item per split, ``("per_user",)`` otherwise
(``Evaluator.from_dataset`` follows the data set: a given test set means ``"per_user"`` for
both splits, so that validation selects on the test's protocol).

The model is reached through two callbacks: ``score(users [B], items [B, C]) -> [B, C]``
and ``score_all(users [B]) -> [B, num_items]``, called on chunks of at most
``batch_size`` users or held-out pairs, so the user x item matrix never exists whole.
Each user's scores are computed once per evaluation, also when several item offsets (the
prior scan of :func:`~hdccf_triton.models.select_prior_strength`) are evaluated at once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from .interactions import check_pairs, csr_keys, csr_segments, pair_keys, sorted_contains, unique_csr

__all__ = ["Evaluator", "evaluate", "format_results", "metrics_from_counts", "per_user_metrics",
           "ranking_metrics", "top_k_items"]

LEAVE_ONE_OUT = ("sampled", "full")
PER_USER = ("per_user",)
PROTOCOLS = LEAVE_ONE_OUT + PER_USER
PROTOCOL_LABELS = {
    "sampled": "sampled (paper protocol: held-out item vs {n} sampled non-interacted items)",
    "full": "full (all items, training items masked; Krichene & Rendle 2020)",
    "per_user": "per user (full ranking of every item, training items masked, the user's held-out set; LightGCN)",
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


def per_user_metrics(hits: torch.Tensor, num_relevant: torch.Tensor,
                     ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Recall@K, NDCG@K, Precision@K and HitRate@K of each user's top list (module docstring).

    Args:
        hits: bool ``[U, L]``, L >= max(ks): whether the item at rank r of user u's list
            is one of u's held-out items.
        num_relevant: int64 ``[U]`` |T_u| >= 1, the size of each held-out set.
        ks: cut-offs K.

    Returns:
        ``{"Recall@K": float64 [U], "NDCG@K": .., "Precision@K": .., "HitRate@K": ..}`` per K.
    """
    ks = _check_ks(ks)
    if hits.dim() != 2 or hits.shape[1] < max(ks) or num_relevant.shape != hits.shape[:1]:
        raise ValueError(f"hits/num_relevant: expected [U, L >= {max(ks)}] and [U], got "
                         f"{tuple(hits.shape)} and {tuple(num_relevant.shape)}")
    if (num_relevant < 1).any():
        raise ValueError("num_relevant: every user needs at least one held-out item")
    h = hits[:, : max(ks)].to(torch.float64)
    n = num_relevant.to(torch.float64)
    discount = 1.0 / torch.log2(torch.arange(2, max(ks) + 2, dtype=torch.float64, device=h.device))
    dcg = torch.cumsum(h * discount, 1)  # [U, Kmax]: DCG of the first r+1 positions
    found = torch.cumsum(h, 1)
    ideal = torch.cumsum(discount, 0)  # [Kmax]: IDCG with r+1 relevant items
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit_k = found[:, k - 1]
        idcg = ideal[torch.clamp(num_relevant, max=k) - 1]
        out[f"Recall@{k}"] = hit_k / n
        out[f"NDCG@{k}"] = dcg[:, k - 1] / idcg
        out[f"Precision@{k}"] = hit_k / k
        out[f"HitRate@{k}"] = (hit_k > 0).to(torch.float64)
    return out


def top_k_items(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k highest scores, ties ordered by column (item id), lower first.

    ``torch.topk`` returns tied values in no documented order, so this fixes the order: within
    the list, equal scores sort by item id; at the boundary, when more items share the k-th
    score than the list has room for, the lowest ids among them are kept. One ``topk`` of
    k + 1 finds the rows where that can happen (the (k+1)-th score equals the k-th); only
    those rows are redone exactly (rare with real scores). The order among −inf scores
    (excluded items) is left as ``topk`` gives it.

    Args:
        scores: float ``[B, I]``, −inf on excluded items; k <= I.

    Returns:
        ``(values [B, k], items [B, k])`` int64 items, best first.
    """
    n = scores.shape[1]
    values, items = torch.topk(scores, min(k + 1, n), dim=1)
    if n > k:
        ambiguous = (values[:, k - 1] == values[:, k]) & (values[:, k - 1] > -torch.inf)
        values, items = values[:, :k].contiguous(), items[:, :k].contiguous()
        for row in torch.nonzero(ambiguous).flatten().tolist():
            last = values[row, -1]
            above = items[row][values[row] > last]
            at = torch.nonzero(scores[row] == last).flatten()[: k - above.numel()]  # ascending ids
            items[row] = torch.cat([above, at])
            values[row] = scores[row, items[row]]
    # the order within the list: by item id, then (stable) by descending score
    by_id = torch.argsort(items, dim=1)
    items, values = items.gather(1, by_id), values.gather(1, by_id)
    by_score = torch.argsort(values, dim=1, descending=True, stable=True)
    return values.gather(1, by_score), items.gather(1, by_score)


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
    """Evaluation of a scoring model on the held-out splits of a data set, built once.

    Holds the masks (CSR of the interactions), the held-out sets and the cached sampled
    negatives.

    Args:
        num_users, num_items: id ranges.
        train_users, train_items: int64 ``[N]`` training pairs.
        valid, test: held-out pairs ``(users [H], items [H])`` (or None).
        num_negatives: sampled negatives per user (paper: 100).
        seed: seed of the sampled negatives (drawn on the CPU, so they do not depend on
            the device).
        device: where masks live and scores are compared; :meth:`evaluate` moves the
            evaluator to the device of an ``nn.Module`` model.
        heldout: ``"leave_one_out"`` (protocols ``"sampled"`` and ``"full"``), ``"sets"``
            (protocol ``"per_user"``), or ``"auto"``: sets when a user holds out more than
            one item in a split, else leave-one-out.

    Attributes:
        heldout_kind: ``"leave_one_out"`` or ``"sets"``.
        protocols: the protocols :meth:`evaluate` computes by default.
        selection: ``(protocol, metric)`` that model selection maximises by default:
            ``("sampled", "NDCG@10")`` for leave-one-out data (the paper's), ``("per_user",
            "Recall@20")`` for held-out sets (LightGCN's).
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
        heldout: str = "auto",
    ) -> None:
        for arg, v in (("num_users", num_users), ("num_items", num_items), ("num_negatives", num_negatives)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TypeError(f"{arg}: expected a positive int, got {v!r}")
        if heldout not in ("auto", "leave_one_out", "sets"):
            raise ValueError(f"heldout: expected 'auto', 'leave_one_out' or 'sets', got {heldout!r}")
        check_pairs(train_users, train_items, num_users, num_items, name="train_users/train_items")
        self.num_users, self.num_items = num_users, num_items
        self.num_negatives, self.seed = num_negatives, int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        tu, ti = train_users.cpu(), train_items.cpu()
        self.heldout = {"valid": _pairs("valid", valid, num_users, num_items),
                        "test": _pairs("test", test, num_users, num_items)}
        vu, vi = self.heldout["valid"]
        su, si = self.heldout["test"]
        several = any(u.numel() > torch.unique(u).numel() for u, _ in self.heldout.values())
        if heldout == "leave_one_out" and several:
            raise ValueError("heldout='leave_one_out': a user holds out several items in a split; "
                             "use 'sets' (per-user Recall/NDCG@K)")
        self.heldout_kind = ("sets" if several else "leave_one_out") if heldout == "auto" else heldout
        self.protocols = PER_USER if self.heldout_kind == "sets" else LEAVE_ONE_OUT
        self.selection = ("per_user", "Recall@20") if self.heldout_kind == "sets" else ("sampled", "NDCG@10")
        # Masks of the full protocols: what is known at that stage and must not compete.
        self.masks = {
            "valid": unique_csr(torch.cat([tu, vu]), torch.cat([ti, vi]), num_users, num_items),
            "test": unique_csr(torch.cat([tu, vu, su]), torch.cat([ti, vi, si]), num_users, num_items),
        }
        # The per-user protocol excludes what is known before the split, not the split itself.
        self.known = {"valid": unique_csr(tu, ti, num_users, num_items), "test": self.masks["valid"]}
        # The held-out sets of the per-user protocol: sorted distinct keys.
        self.heldout_keys = {k: torch.unique(pair_keys(u, i, num_items)) for k, (u, i) in self.heldout.items()}
        self._negatives: torch.Tensor | None = None
        self.to(self.device)

    @classmethod
    def from_dataset(cls, dataset: Any, **kwargs: Any) -> "Evaluator":
        """An evaluator of a :class:`hdccf_triton.data.Dataset` (its valid and test splits);
        a data set with a given test set (``test_pairs``) is evaluated as held-out sets."""
        kwargs.setdefault("heldout", "sets" if getattr(dataset, "test_pairs", None) is not None else "auto")
        return cls(dataset.num_users, dataset.num_items, dataset.train_users, dataset.train_items,
                   dataset.heldout("valid"), dataset.heldout("test"), **kwargs)

    def to(self, device: torch.device | str) -> "Evaluator":
        """Move masks, held-out sets and negatives to ``device`` (returns self)."""
        self.device = torch.device(device)
        self.masks = {k: type(m)(*(t.to(self.device) for t in m)) for k, m in self.masks.items()}
        self.known = {"valid": type(self.known["valid"])(*(t.to(self.device) for t in self.known["valid"])),
                      "test": self.masks["valid"]}
        self.heldout = {k: (u.to(self.device), i.to(self.device)) for k, (u, i) in self.heldout.items()}
        self.heldout_keys = {k: t.to(self.device) for k, t in self.heldout_keys.items()}
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
        protocols: Sequence[str] | None = None,
        batch_size: int = 1024,
        item_offsets: dict[Any, torch.Tensor] | None = None,
    ) -> dict:
        """The metrics of a model on ``split`` under each protocol.

        Args:
            model: an object with ``score(users [B], items [B, C]) -> [B, C]`` and/or
                ``score_all(users [B]) -> [B, num_items]`` (one is derived from the other
                when missing). The callbacks get int64 ids on the evaluator's device and
                return scores there; an ``nn.Module`` model moves the evaluator to the
                device of its parameters first.
            split: ``"valid"`` or ``"test"``.
            ks: cut-offs K.
            score, score_all: callbacks overriding the model's.
            protocols: a subset of :attr:`protocols` plus, on leave-one-out data,
                ``"per_user"``; None: :attr:`protocols`.
            batch_size: users (per-user protocol) or held-out pairs scored per call; the
                results do not depend on it.
            item_offsets: ``{key: [num_items] tensor}``: evaluate the scores plus each
                offset (e.g. ``{α: α·log q}``), the model's scores computed once.

        Returns:
            ``{"sampled": {"HR@10": .., "NDCG@10": .., ...}, "full": {...}}`` (leave-one-out:
            means over the held-out pairs) or ``{"per_user": {"Recall@K": .., "NDCG@K": ..,
            "Precision@K": .., "HitRate@K": ..}}`` (held-out sets: means over the users);
            with ``item_offsets``, ``{key: such a dict}``.
        """
        ks = _check_ks(ks)
        if split not in self.heldout:
            raise ValueError(f"split: expected 'valid' or 'test', got {split!r}")
        protocols = tuple(self.protocols if protocols is None else protocols)
        allowed = PROTOCOLS if self.heldout_kind == "leave_one_out" else PER_USER
        bad = [p for p in protocols if p not in allowed]
        if bad or not protocols:
            why = " (sampled and full rank one held-out item per user; these are held-out sets)" \
                if self.heldout_kind == "sets" and set(bad) <= set(LEAVE_ONE_OUT) else ""
            raise ValueError(f"protocols: expected a subset of {allowed}, got {protocols!r}{why}")
        if "per_user" in protocols and max(ks) > self.num_items:  # a top-K list needs K items
            raise ValueError(f"ks: cut-off {max(ks)} exceeds the {self.num_items} items")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        offsets = self._offsets(item_offsets)
        score, score_all = self._callbacks(model, score, score_all)
        users, items = self.heldout[split]
        if users.numel() == 0:
            raise ValueError(f"split: no held-out pairs in {split!r}")
        order = torch.argsort(users, stable=True)  # chunks of few distinct users
        users, items = users[order], items[order]
        results: dict[Any, dict] = {key: {} for key in offsets}
        with torch.no_grad():
            for protocol in protocols:
                if protocol == "per_user":
                    per_offset = self._per_user(split, torch.unique_consecutive(users), ks, score_all,
                                                offsets, batch_size)
                else:
                    chunks = [self._counts(protocol, split, users[s:s + batch_size], items[s:s + batch_size],
                                           score, score_all, offsets) for s in range(0, users.numel(), batch_size)]
                    per_offset = {}
                    for key in offsets:
                        g = torch.cat([c[key][0] for c in chunks])
                        e = torch.cat([c[key][1] for c in chunks])
                        per_offset[key] = metrics_from_counts(g, e, ks)
                for key, per_instance in per_offset.items():
                    results[key][protocol] = {name: float(v.mean()) for name, v in per_instance.items()}
        return results if item_offsets is not None else results[None]

    def _offsets(self, item_offsets: dict | None) -> dict:
        if item_offsets is None:
            return {None: None}
        if not isinstance(item_offsets, dict) or not item_offsets:
            raise TypeError("item_offsets: expected a non-empty dict {key: [num_items] tensor}")
        out = {}
        for key, t in item_offsets.items():
            if not isinstance(t, torch.Tensor) or t.shape != (self.num_items,) or not t.dtype.is_floating_point:
                raise ValueError(f"item_offsets[{key!r}]: expected a float tensor of shape [{self.num_items}]")
            if not torch.isfinite(t).all():
                raise ValueError(f"item_offsets[{key!r}]: expected finite values")
            out[key] = t.to(self.device)
        return out

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
                score: Callable, score_all: Callable, offsets: dict) -> dict:
        """{offset key: (g, e) per held-out pair} of one chunk (leave-one-out protocols)."""
        if protocol == "sampled":
            negs = self.negatives[users]
            cand = torch.cat([items.unsqueeze(1), negs], 1)
            raw = _as_scores(score(users, cand), (users.numel(), cand.shape[1]), "score")
            out = {}
            for key, offset in offsets.items():
                s = raw if offset is None else raw + offset[cand]
                out[key] = _rank_counts(s[:, 0], s[:, 1:])
            return out
        uniq, inv = torch.unique_consecutive(users, return_inverse=True)
        raw = _as_scores(score_all(uniq), (uniq.numel(), self.num_items), "score_all").contiguous()
        mask = self.masks[split]
        local, flat = csr_segments(mask.indptr, users)
        masked_at = inv.index_select(0, local) * self.num_items + mask.indices.index_select(0, flat)
        out = {}
        for key, offset in offsets.items():
            s = raw if offset is None else raw + offset
            flat_scores = s.view(-1)
            pos = flat_scores.index_select(0, inv * self.num_items + items)
            rows = s if uniq.numel() == users.numel() else s.index_select(0, inv)
            greater, equal = _rank_counts(pos, rows)
            # Take the masked items back out (they include the held-out item itself, so its tie
            # with itself goes too): compare them one by one rather than copy and mask the rows.
            masked = flat_scores.index_select(0, masked_at)
            p = pos.index_select(0, local)
            greater = greater.index_add(0, local, (masked > p).long(), alpha=-1)
            equal = equal.index_add(0, local, (masked == p).long(), alpha=-1)
            out[key] = (greater, equal)
        return out

    def _per_user(self, split: str, users: torch.Tensor, ks: tuple[int, ...], score_all: Callable,
                  offsets: dict, batch_size: int) -> dict:
        """{offset key: per-user metrics ``[U]``} of the users with held-out items in ``split``."""
        mask, keys, kmax, n_items = self.known[split], self.heldout_keys[split], max(ks), self.num_items
        num_relevant = torch.bincount(keys // n_items, minlength=self.num_users)
        parts: dict[Any, list] = {key: [] for key in offsets}
        buffer = None  # one [batch, num_items] buffer for every chunk: fresh pages cost more than the copy
        for s0 in range(0, users.numel(), batch_size):
            b_users = users[s0:s0 + batch_size]
            raw = _as_scores(score_all(b_users), (b_users.numel(), n_items), "score_all")
            if buffer is None or buffer.dtype != raw.dtype:
                buffer = torch.empty(min(batch_size, users.numel()), n_items, dtype=raw.dtype, device=raw.device)
            local, flat = csr_segments(mask.indptr, b_users)
            masked_at = local * n_items + mask.indices.index_select(0, flat)  # known items: never ranked
            for key, offset in offsets.items():
                b_s = buffer[: b_users.numel()]  # never write into the model's tensor
                b_s.copy_(raw) if offset is None else torch.add(raw, offset, out=b_s)
                b_s.view(-1).index_fill_(0, masked_at, -torch.inf)
                values, top = top_k_items(b_s, kmax)  # [B, kmax]
                hits = sorted_contains(keys, pair_keys(b_users[:, None], top, n_items)) & (values > -torch.inf)
                parts[key].append(per_user_metrics(hits, num_relevant[b_users], ks))
        return {key: {name: torch.cat([p[name] for p in chunks]) for name in chunks[0]}
                for key, chunks in parts.items()}


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
