"""Argument checks of the loss: every bad input becomes a ValueError or TypeError naming it.

Value checks (ids in range, finite embeddings) need the data, so they are gathered into one
small tensor and read back with a single device synchronisation.
"""

from __future__ import annotations

import struct

import torch

from .interactions import InteractionIndex
from .similarity import Similarity, as_similarity
from .terms import ExtraNegatives, LossInputs

__all__ = ["validate_inputs"]

_EMBEDDINGS = ("user_emb", "item_emb", "pool_item_emb", "pool_user_emb")
_IDS = ("users", "items", "pool_items", "pool_users")


def validate_inputs(
    tensors: tuple, interactions: InteractionIndex | None, similarity: "Similarity | str" = "dot",
    temperature: float | None = None, *, extra_negatives: ExtraNegatives | None = None,
    item_log_q: torch.Tensor | None = None, user_log_q: torch.Tensor | None = None,
) -> LossInputs:
    """Check shapes, dtypes, devices and values; return the inputs with int64 ids.

    ``extra_negatives`` (the mixed negatives) and ``item_log_q``, ``user_log_q`` (the sampling
    corrections, one value per id) are checked likewise and carried in the result.

    ``similarity``: the options' similarity; it checks the embeddings' layout
    (:meth:`Similarity.check_inputs`: a ModulatedSimilarity requires a last dimension of
    ``2·similarity.dim`` and its parameters on their device), and its parameters must be finite.
    ``temperature``: with it, finite embeddings whose scores could overflow the accumulation
    dtype (|f| ≤ d · max|a| · max|b| / τ, unless the similarity is a cosine) are refused too:
    they would give an infinite or NaN loss.
    """
    similarity = as_similarity(similarity)
    names = _EMBEDDINGS + _IDS
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    user_emb, item_emb, pool_item_emb, pool_user_emb, users, items, pool_items, pool_users = tensors

    for name, t in zip(_EMBEDDINGS, tensors[:4]):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if len({t.dtype for t in tensors[:4]}) != 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(_EMBEDDINGS, tensors[:4]))
        raise TypeError(f"the four embedding tensors must share one dtype, got {got}")

    if user_emb.dim() != 2:
        raise ValueError(f"user_emb must have shape [M, d], got {tuple(user_emb.shape)}")
    M, d = user_emb.shape
    if M == 0:
        raise ValueError("the batch is empty: user_emb has M = 0 rows")
    if d == 0:
        raise ValueError("user_emb has d = 0: embeddings need at least one dimension")
    if item_emb.shape != (M, d):
        raise ValueError(f"item_emb must have shape [M, d] = {[M, d]}, got {list(item_emb.shape)}")
    if pool_item_emb.dim() != 3 or pool_item_emb.shape[0] != M or pool_item_emb.shape[2] != d:
        raise ValueError(
            f"pool_item_emb must have shape [M, P, d] = [{M}, P, {d}], got {list(pool_item_emb.shape)}"
        )
    P = pool_item_emb.shape[1]
    if P == 0:
        raise ValueError("pool_item_emb has P = 0: each row needs at least one pool entry")
    if pool_user_emb.shape != pool_item_emb.shape:
        raise ValueError(
            f"pool_user_emb must have the shape of pool_item_emb {list(pool_item_emb.shape)}, "
            f"got {list(pool_user_emb.shape)}"
        )

    similarity.check_inputs(d, user_emb.device)

    expected = {"users": (M,), "items": (M,), "pool_items": (M, P), "pool_users": (M, P)}
    for name, t in zip(_IDS, tensors[4:]):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids (int64), got dtype {t.dtype}")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {list(expected[name])}, got {list(t.shape)}")

    device = user_emb.device
    for name, t in zip(names, tensors):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but user_emb is on {device}: move all inputs to one device")
    if interactions is not None:
        if not isinstance(interactions, InteractionIndex):
            raise TypeError(
                f"interactions must be an InteractionIndex or None, got {type(interactions).__name__}"
            )
        if interactions.device != device:
            raise ValueError(
                f"interactions is on {interactions.device} but the embeddings are on {device}: "
                f"use interactions.to({str(device)!r})"
            )

    ids = [t.to(torch.int64) for t in tensors[4:]]
    params = list(similarity.named_parameters())
    score_bound = None if temperature is None or similarity.normalize else float(temperature)
    extra = None if extra_negatives is None else _checked_extra(extra_negatives, user_emb)
    tables = {name: _checked_table(name, table, interactions, kind, device)
              for name, table, kind in (("item_log_q", item_log_q, "num_items"), ("user_log_q", user_log_q, "num_users"))}
    _check_values(tensors[:4], ids, interactions, params, score_bound, extra, tables)
    log_q = None
    if item_log_q is not None or user_log_q is not None:
        log_q = tuple(None if t is None else t.detach() for t in tables.values())
    return LossInputs(user_emb, item_emb, pool_item_emb, pool_user_emb, *ids, extra, log_q)


_EXTRA = ("extra_negatives.item_emb", "extra_negatives.user_emb", "extra_negatives.items", "extra_negatives.users")


def _checked_extra(extra, user_emb: torch.Tensor) -> ExtraNegatives:
    """The mixed negatives' types, shapes, dtypes and device (their values are checked with the
    rest, :func:`_check_values`): embeddings ``[B′, d]`` in the embeddings' dtype, ids ``[B′]``,
    returned as int64."""
    if not isinstance(extra, ExtraNegatives):
        raise TypeError(
            "extra_negatives must be an ExtraNegatives(item_emb, user_emb, items, users) or None, "
            f"got {type(extra).__name__}"
        )
    for name, t in zip(_EXTRA, extra):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != user_emb.device:
            raise ValueError(f"{name} is on {t.device} but user_emb is on {user_emb.device}: move all inputs to one device")
    d = user_emb.shape[1]
    if extra.item_emb.dim() != 2 or extra.item_emb.shape[0] == 0 or extra.item_emb.shape[1] != d:
        raise ValueError(f"{_EXTRA[0]} must have shape [B', d] with B' >= 1 and d = {d}, got {list(extra.item_emb.shape)}")
    B = extra.item_emb.shape[0]
    for name, t in zip(_EXTRA[:2], extra[:2]):
        if t.dtype != user_emb.dtype:
            raise TypeError(f"{name} must have the embeddings' dtype {user_emb.dtype}, got {t.dtype}")
        if tuple(t.shape) != (B, d):
            raise ValueError(f"{name} must have shape [B', d] = {[B, d]}, got {list(t.shape)}")
    for name, t in zip(_EXTRA[2:], extra[2:]):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids (int64), got dtype {t.dtype}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape [B'] = [{B}], got {list(t.shape)}")
    return ExtraNegatives(extra.item_emb, extra.user_emb, extra.items.to(torch.int64), extra.users.to(torch.int64))


def _checked_table(name: str, table, interactions, kind: str, device) -> torch.Tensor | None:
    """A sampling-correction table's type, shape and device: None, or a floating 1-D tensor on
    ``device`` (``interactions.num_items`` / ``num_users`` entries when given); its values and
    its cover of the columns' ids are checked with the rest (:func:`_check_values`)."""
    if table is None:
        return None
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(table).__name__}")
    if not table.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {table.dtype}")
    if table.dim() != 1:
        raise ValueError(f"{name} must have shape [{kind}] (one value per id), got {list(table.shape)}")
    if table.device != device:
        raise ValueError(f"{name} is on {table.device} but user_emb is on {device}: move all inputs to one device")
    if interactions is not None and table.shape[0] != getattr(interactions, kind):
        raise ValueError(f"{name} must have {kind} = {getattr(interactions, kind)} entries, got {table.shape[0]}")
    return table


def _check_values(embeddings, ids, interactions, params=(), temperature=None, extra=None, tables=None) -> None:
    """Ids non-negative and in the index's range; embeddings, the mixed negatives' embeddings,
    the correction tables and the similarity's parameters finite; every column id covered by
    its table; with a temperature, scores that cannot overflow: one synchronisation."""
    tables = {k: t for k, t in (tables or {}).items() if t is not None}
    id_names, id_tensors = list(_IDS), list(ids)
    emb_names, emb_tensors = list(_EMBEDDINGS), list(embeddings)
    if extra is not None:
        id_names += list(_EXTRA[2:])
        id_tensors += list(extra[2:])
        emb_names += list(_EXTRA[:2])
        emb_tensors += list(extra[:2])
    probes = [torch.stack([t.min(), t.max()]).to(torch.int64) for t in id_tensors]
    finite = ([torch.isfinite(t).all() for t in emb_tensors] + [torch.isfinite(t).all() for t in tables.values()]
              + [torch.isfinite(p.detach()).all() for _, p in params])
    probes.append(torch.stack(finite).to(torch.int64))
    if temperature is not None:  # max |entry| of each embedding tensor, as float64 bits: one sync with the rest
        probes.append(torch.stack([t.detach().abs().amax().double() for t in emb_tensors]).view(torch.int64))
    values = torch.cat(probes).tolist()
    if temperature is not None:
        largest = [struct.unpack("<d", struct.pack("<q", v))[0] for v in values[-len(emb_tensors):]]
        values = values[: -len(emb_tensors)]
    highest = {}
    for n, name in enumerate(id_names):
        lo, hi = values[2 * n], values[2 * n + 1]
        kind = "num_users" if name.endswith("users") else "num_items"
        if name not in ("users", "items"):  # a column's id: the tables must cover it
            highest[kind] = max(highest.get(kind, hi), hi)
        if lo < 0:
            raise ValueError(f"{name} must be non-negative ids, got a minimum of {lo}")
        if interactions is not None:
            upper = getattr(interactions, kind)
            if hi >= upper:
                raise ValueError(
                    f"{name} holds id {hi}, outside the interaction index's range [0, {upper}) ({kind}={upper})"
                )
    names = emb_names + list(tables) + [f"similarity.{name}" for name, _ in params]
    for name, finite in zip(names, values[2 * len(id_names):]):
        if not finite:
            hint = ": give finite log-probabilities" if name in tables else ""
            raise ValueError(f"{name} holds non-finite values (NaN or inf){hint}")
    for name, table in tables.items():  # the columns' ids: pool items (users) and the mixed negatives
        top = highest["num_items" if name == "item_log_q" else "num_users"]
        if top >= table.shape[0]:
            raise ValueError(f"{name} has {table.shape[0]} entries but a column has id {top}")
    if temperature is not None:
        u, i, x, y = largest[:4]
        if extra is not None:  # the mixed negatives are scored as the pools are
            x, y = max(x, largest[4]), max(y, largest[5])
        _check_score_range(embeddings, [u, i, x, y], temperature)


def _check_score_range(embeddings, largest, temperature) -> None:
    """Refuse finite embeddings whose scores f/τ could overflow the accumulation dtype.

    Every score is a sum of d products of one entry of each side (the modulation m ≤ 1 only
    shrinks them), so |f|/τ ≤ d · max|a| · max|b| / τ over the pairs of tensors that are scored
    against each other."""
    d = embeddings[0].shape[-1]
    acc = torch.float64 if embeddings[0].dtype == torch.float64 else torch.float32
    u, i, x, y = largest  # user_emb, item_emb, pool_item_emb, pool_user_emb
    bound = d * max(u * i, u * x, i * y, u * y, i * x) / temperature
    if bound >= torch.finfo(acc).max:
        big = max(zip(largest, _EMBEDDINGS))
        raise ValueError(
            f"the scores may overflow {acc}: embedding entries up to {big[0]:.3g} in magnitude ({big[1]}) "
            f"give scores up to about {bound:.3g} at temperature {temperature:g}, beyond {torch.finfo(acc).max:.3g}; "
            "the embeddings' scale has diverged: lower the learning rate, add weight decay, or use "
            "similarity='cosine'"
        )
