"""The in-batch sampler of ``hdccf_triton/LOSS.md``, section "Batch" (eq. 9 of the paper).

A batch has M rows. Row k holds a training pair (u_k, i_k) and two pools:

* ``pool_items[k, :]``: P items drawn uniformly with replacement from the training items
  of u_k other than i_k; i_k itself when u_k has no other item;
* ``pool_users[k, :]``: P users drawn likewise from the training users of i_k other
  than u_k; u_k itself when i_k has no other user.

An epoch is one pass over a seeded permutation of the training pairs, M at a time (the
last, partial batch is kept unless ``drop_last``). Everything is vectorised in torch on
the sampler's device; there is no Python loop over rows.

Why the pools give popularity-weighted negatives (Proposition 1): a pool item of a row is
item j with probability sum over the pairs (u, i), j in N_u, j != i, of
(1/N)·1/(deg_u - 1) = deg_j / N, i.e. exactly proportional to the popularity of j.

Two options of hdccf_triton/LOSS.md build on that: the sampling-bias correction
(:meth:`InBatchSampler.sampling_log_q` gives ℓ of every id from the degrees) and the mixed
negatives (``num_extra`` = B′ items and B′ users drawn uniformly per batch, shared by all rows:
:class:`MixedBatch`).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from .interactions import InteractionIndex, build_csr, check_pairs, pair_keys

__all__ = ["Batch", "MixedBatch", "InBatchSampler"]


class Batch(NamedTuple):
    """One batch of ids, all int64 on the sampler's device.

    Attributes:
        users: ``[M]`` u_k.
        items: ``[M]`` i_k.
        pool_items: ``[M, P]`` items of u_k other than i_k (i_k if none).
        pool_users: ``[M, P]`` users of i_k other than u_k (u_k if none).
    """

    users: torch.Tensor
    items: torch.Tensor
    pool_items: torch.Tensor
    pool_users: torch.Tensor


class MixedBatch(NamedTuple):
    """A :class:`Batch` with mixed negatives (a sampler with ``num_extra`` = B′ > 0): its four
    fields, then ``extra_items [B′]`` and ``extra_users [B′]``, uniform over the catalogue and
    shared by every row (int64)."""

    users: torch.Tensor
    items: torch.Tensor
    pool_items: torch.Tensor
    pool_users: torch.Tensor
    extra_items: torch.Tensor
    extra_users: torch.Tensor


def _mix_seed(seed: int, epoch: int) -> int:
    # Independent, reproducible streams per (seed, epoch); SeedSequence decorrelates them.
    seed, epoch = int(seed), int(epoch)
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch & 0xFFFFFFFF])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class InBatchSampler:
    """Batches of training pairs with per-row item and user pools, as ``hdccf_triton/LOSS.md``
    ("Batch") defines them.

    Args:
        users, items: int64 ``[N]`` training pairs (unique).
        num_users, num_items: id ranges.
        batch_size: M, rows per batch.
        num_pool: P, pool size per row.
        seed: seed of the permutations and the pools; the batches of epoch e depend only
            on (data, seed, e) and the device type (CPU and CUDA generators differ).
        device: where the index lives and the batches are built (default: that of ``users``).
        drop_last: drop the last, partial batch of each epoch.
        num_extra: B′, mixed negatives per batch: B′ items and B′ users drawn uniformly with
            replacement from the whole catalogue, from a stream of their own (so the
            permutation and the pools are the same draws with and without them); 0: none.

    Iterating yields the batches of the current epoch (``set_epoch``); ``epoch_batches(e)``
    yields those of epoch e directly. ``len(sampler)`` is the number of batches per epoch.

    Example::

        sampler = InBatchSampler(ds.train_users, ds.train_items, ds.num_users, ds.num_items,
                                 batch_size=1024, num_pool=4, seed=0)
        for epoch in range(epochs):
            for users, items, pool_items, pool_users in sampler.epoch_batches(epoch):
                ...

    With ``num_extra`` = B′ > 0 the batches are :class:`MixedBatch` es (two more fields).
    """

    def __init__(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        num_users: int,
        num_items: int,
        batch_size: int,
        num_pool: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        drop_last: bool = False,
        num_extra: int = 0,
    ) -> None:
        for arg, v in (("num_users", num_users), ("num_items", num_items),
                       ("batch_size", batch_size), ("num_pool", num_pool)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise TypeError(f"{arg}: expected a positive int, got {v!r}")
        if not isinstance(num_extra, (int, np.integer)) or isinstance(num_extra, bool) or num_extra < 0:
            raise TypeError(f"num_extra: expected an int >= 0, got {num_extra!r}")
        self.num_extra = int(num_extra)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        check_pairs(users, items, num_users, num_items)
        self.device = torch.device(device) if device is not None else users.device
        self.users = users.to(self.device)
        self.items = items.to(self.device)
        self.num_users, self.num_items = int(num_users), int(num_items)
        self.batch_size, self.num_pool = int(batch_size), int(num_pool)
        self.seed, self.drop_last, self.epoch = int(seed), bool(drop_last), 0
        self.by_user = build_csr(self.users, self.items, self.num_users, self.num_items)
        self.by_item = build_csr(self.items, self.users, self.num_items, self.num_users)
        # The sorted keys that test uniqueness are the index of D, built here once.
        keys = torch.unique(pair_keys(self.users, self.items, self.num_items))  # sorted
        if keys.numel() != self.users.numel():
            # A repeated pair would let "other than i_k" draw i_k again through its twin.
            raise ValueError("users/items: training pairs must be unique (drop repeated pairs first)")
        self._index = InteractionIndex(keys, self.num_users, self.num_items)
        # Both CSR index arrays end to end, so one gather serves the item and the user pools.
        self._indices = torch.cat([self.by_user.indices, self.by_item.indices])
        # Everything a row needs, one 64-byte row per training pair ([N, 8]: one cache
        # line), so that a batch costs one index_select: user, item, segment starts (user
        # row, item row), degrees and the pair's own position in each segment.
        n = self.num_train
        self._table = torch.stack([
            self.users, self.items,
            self.by_user.indptr[self.users], self.by_item.indptr[self.items] + n,
            self.by_user.degree[self.users], self.by_item.degree[self.items],
            self.by_user.position, self.by_item.position,
        ], dim=1).contiguous()

    def interaction_index(self) -> InteractionIndex:
        """The :class:`~hdccf_triton.interactions.InteractionIndex` of the training pairs
        (the loss's false-negative test), on the sampler's device; the same object on every
        call, so that its bitmap is built once."""
        return self._index

    @property
    def num_train(self) -> int:
        """Number of training pairs N."""
        return int(self.users.numel())

    def __len__(self) -> int:
        full, rest = divmod(self.num_train, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that ``iter(sampler)`` produces."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch_batches(self.epoch)

    def generator(self, epoch: int) -> torch.Generator:
        """The seeded generator of ``epoch`` (on the sampler's device)."""
        return torch.Generator(device=self.device).manual_seed(_mix_seed(self.seed, epoch))

    def permutation(self, epoch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """int64 ``[N]``: the order in which epoch ``epoch`` visits the training pairs."""
        gen = generator if generator is not None else self.generator(epoch)
        return torch.randperm(self.num_train, generator=gen, device=self.device)

    def epoch_batches(self, epoch: int) -> Iterator[Batch | MixedBatch]:
        """Yield the batches of ``epoch``: M pairs each of one seeded permutation."""
        gen = self.generator(epoch)
        perm = self.permutation(epoch, gen)
        stop = len(self) * self.batch_size
        # the mixed negatives' own stream: the pools do not depend on whether they are drawn
        extra_gen = torch.Generator(device=self.device).manual_seed(_mix_seed(self.seed, epoch + (1 << 31)))
        for start in range(0, min(stop, self.num_train), self.batch_size):
            yield self.batch(perm[start:start + self.batch_size], gen, extra_gen)

    def batch(self, rows: torch.Tensor, generator: torch.Generator,
              extra_generator: torch.Generator | None = None) -> Batch | MixedBatch:
        """The batch of training pairs ``rows`` (int64 ``[M]`` indices into the pairs).

        Pools are drawn with ``generator``, the mixed negatives with ``extra_generator``
        (default: ``generator``, after the pools); no Python loop over the rows. For each of the
        two pools (item side, user side) and each row: draw r uniform in [0, deg-1) among
        the deg-1 other entries of the row's CSR segment, then step over the pair's own
        position (r >= own -> r + 1); a segment that holds only the pair gives the pair's
        own entry (i_k resp. u_k).
        """
        # index_select rather than advanced indexing: on small tensors the latter
        # dispatches to the thread pool, which costs milliseconds on a busy CPU.
        info = torch.index_select(self._table, 0, rows).T.contiguous()  # [8, M]
        start, deg, own = info[2:4].unsqueeze(2), info[4:6].unsqueeze(2), info[6:8].unsqueeze(2)
        m = rows.numel()
        others = (deg - 1).clamp_min(1)  # [2, M, 1]; the clamp avoids % 0
        # 62 random bits modulo the count: bias below 2^-40 for any realistic degree.
        r = torch.randint(0, 1 << 62, (2, m, self.num_pool), generator=generator,
                          device=self.device) % others
        r = r + (r >= own).long()
        r = torch.where(deg > 1, r, own)
        pools = torch.index_select(self._indices, 0, (start + r).flatten()).view(2, m, self.num_pool)
        if not self.num_extra:
            return Batch(info[0], info[1], pools[0], pools[1])
        # the mixed negatives: uniform over the catalogue
        gen = generator if extra_generator is None else extra_generator
        extra_items = torch.randint(0, self.num_items, (self.num_extra,), generator=gen, device=self.device)
        extra_users = torch.randint(0, self.num_users, (self.num_extra,), generator=gen, device=self.device)
        return MixedBatch(info[0], info[1], pools[0], pools[1], extra_items, extra_users)

    def sampling_log_q(self, num_extra: int | None = None, batch_size: int | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling corrections ℓ of hdccf_triton/LOSS.md ("Sampling-bias correction") for
        every item and user id: ``(item_log_q [num_items], user_log_q [num_users])``.

        A negative column of a batch is a pool entry with probability NP / (NP + B′) (NP = M·P
        pool columns, B′ = ``num_extra`` mixed negatives) and then id v with probability
        deg(v)/|D| (Proposition 1), else a uniform draw, 1/|V|. So

            q(v) = (NP·deg(v)/|D| + B′/|V|) / (NP + B′),      ℓ(v) = log(|V|·q(v))

        relative to uniform sampling (ℓ = 0 for every id when sampling is uniform), so that
        E_q[e^{−ℓ}] = 1: the corrected sum over Q sampled negatives estimates the sum over Q
        uniform ones. An id without training pairs (never a pool entry) is given deg = 1.

        Args:
            num_extra: B′ (default: this sampler's ``num_extra``).
            batch_size: M of the batches the loss sees (default: this sampler's; M·W when the
                pools are gathered across W ranks).
        """
        num_extra = self.num_extra if num_extra is None else int(num_extra)
        M = self.batch_size if batch_size is None else int(batch_size)
        NP, n = M * self.num_pool, float(self.num_train)
        out = []
        for csr, size in ((self.by_item, self.num_items), (self.by_user, self.num_users)):
            deg = csr.degree.to(torch.float64).clamp_min(1.0)
            q = (NP * deg / n + num_extra / size) / (NP + num_extra)
            out.append(torch.log(q * size).to(dtype))
        return out[0], out[1]
