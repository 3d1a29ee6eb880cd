"""The PyTorch reference of the HDCCF loss: SPEC.md as readable code.

It is the test oracle of every other backend and the CPU path. Notation follows SPEC.md:
row k of the batch holds the pair (u_k, i_k); the pools are flattened to columns
j = m·P + p, X_j the pool items and Y_j the pool users; the columns with m = k are row k's
*own block*, every other column is one of its Q = P·(M−1) negatives. Scores (divided by τ):

    s_k = f(u_k, i_k)    A[k,j] = f(u_k, X_j)    B[k,j] = f(Y_j, i_k)
    C[k,j] = f(u_k, Y_j) E[k,j] = f(i_k, X_j)

How it stays exact and finite:

* every sum of exponentials is kept as its logarithm (``logsumexp`` over a mask, ``-inf``
  when the mask is empty), and the terms are combined in log space, so scores of ±500
  neither overflow nor vanish, whatever the other columns of the row hold;
* the debiased negative score F = max(a − b, floor) is ``log(a − b) = log a + log(1 − b/a)``
  where it does not bind and the constant ``log floor`` where it does, chosen by a mask
  computed first, and every branch of a ``where`` is fed inputs that are finite in it, so no
  NaN can reach a gradient (the usual ``where`` trap);
* rows are processed in chunks whose M × M·P matrices stay below :data:`CHUNK_ELEMENTS`
  entries, each chunk under activation checkpointing, so forward and backward at
  M = 8192, P = 4 fit in a few GiB.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .interactions import InteractionIndex
from .options import LossOptions

__all__ = ["per_row_loss", "CHUNK_ELEMENTS"]

#: Largest number of entries of one chunk's [rows, M·P] score matrix.
CHUNK_ELEMENTS = 1 << 22

_LN2 = math.log(2.0)


def per_row_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    pool_item_emb: torch.Tensor,
    pool_user_emb: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    pool_items: torch.Tensor,
    pool_users: torch.Tensor,
    interactions: InteractionIndex | None,
    options: LossOptions,
) -> torch.Tensor:
    """loss[k] of SPEC.md for every row (inputs already validated).

    Args:
        user_emb, item_emb: ``[M, d]`` embeddings of u_k and i_k.
        pool_item_emb, pool_user_emb: ``[M, P, d]`` embeddings of the pools.
        users, items: ``[M]`` int64 ids; pool_items, pool_users: ``[M, P]`` int64 ids.
        interactions: the training pairs D, or None (only identity false negatives).
        options: the validated options.

    Returns:
        ``[M]`` per-row loss, in float32 for half-precision inputs, else the input dtype.
    """
    dtype = torch.promote_types(user_emb.dtype, torch.float32)
    U, I, X, Y = (t.to(dtype) for t in (user_emb, item_emb, pool_item_emb, pool_user_emb))
    if options.cosine:
        U, I, X, Y = (F.normalize(t, dim=-1, eps=1e-12) for t in (U, I, X, Y))
    M, P, d = X.shape
    inv_tau = 1.0 / options.temperature

    s = (U * I).sum(-1) * inv_tau  # [M]
    own_A = torch.einsum("kpd,kd->kp", X, U) * inv_tau  # [M, P] f(u_k, X_own)
    own_B = torch.einsum("kpd,kd->kp", Y, I) * inv_tau  # [M, P] f(Y_own, i_k)
    own_C = torch.einsum("kpd,kd->kp", Y, U) * inv_tau  # [M, P] f(u_k, Y_own)
    own_E = torch.einsum("kpd,kd->kp", X, I) * inv_tau  # [M, P] f(i_k, X_own)

    stats = _negative_statistics(
        U, I, X.reshape(M * P, d), Y.reshape(M * P, d),
        users, items, pool_items.reshape(-1), pool_users.reshape(-1),
        interactions, options,
    )
    lse_A, lse_B, lse_C, lse_E, n_item, n_user = stats

    Q = P * (M - 1)
    log_Q = math.log(Q) if Q > 0 else -math.inf
    if options.debias:
        log_floor = log_Q - inv_tau
        log_FU = _debiased_log_negative_score(
            s, lse_B, n_user, own_B, options.omega_user, Q, P, log_floor
        )
        log_FI = _debiased_log_negative_score(
            s, lse_A, n_item, own_A, options.omega_item, Q, P, log_floor
        )
        log_GU = log_Q - torch.log(n_user.clamp(min=1).to(dtype)) + lse_C
        log_GI = log_Q - torch.log(n_item.clamp(min=1).to(dtype)) + lse_E
    else:
        log_FU, log_FI, log_GU, log_GI = lse_B, lse_A, lse_C, lse_E

    # L_ui = −s + log(e^s + F^U + F^I)
    loss_ui = torch.logsumexp(torch.stack([s, log_FU, log_FI]), dim=0) - s
    # L_uu = Σ_own −C + log(e^C + G) = Σ_own log(1 + G·e^{−C})
    loss_uu = torch.logaddexp(torch.zeros_like(own_C), log_GU[:, None] - own_C).sum(-1)
    loss_ii = torch.logaddexp(torch.zeros_like(own_E), log_GI[:, None] - own_E).sum(-1)
    return loss_ui + options.lambda_user * loss_uu + options.lambda_item * loss_ii


def _debiased_log_negative_score(s, lse_true, n_true, own, omega, Q, P, log_floor):
    """log Fᵁ (or log Fᴵ) of SPEC.md, eq. 14-16, for every row.

        a = Q / ((1−ω)·n) · Σ_{true negatives} e^score            (0 when n = 0)
        b = Q·ω / ((1−ω)·(P+1)) · (e^s + Σ_{own block} e^score)
        F = max(a − b, Q·e^{−1/τ})

    Args:
        s: ``[M]`` positive scores; lse_true: ``[M]`` log Σ over true negatives (−inf if none);
        n_true: ``[M]`` number of true negatives; own: ``[M, P]`` own-block scores.
    """
    if Q == 0:  # M = 1: no negatives, F = 0 (the floor Q·e^{−1/τ} is 0 too)
        return torch.full_like(s, -math.inf)
    log_coef_a = math.log(Q) - math.log1p(-omega) - torch.log(n_true.clamp(min=1).to(s.dtype))
    log_a = log_coef_a + lse_true  # −inf when n = 0
    if omega > 0:
        log_coef_b = math.log(Q * omega) - math.log1p(-omega) - math.log(P + 1)
        log_b = log_coef_b + torch.logaddexp(s, torch.logsumexp(own, dim=-1))
    else:
        log_b = torch.full_like(s, -math.inf)
    floor = torch.full_like(s, log_floor)
    with torch.no_grad():
        binds = log_a <= torch.logaddexp(log_b, floor)
    # Feed each branch only values that are finite in it, so no NaN reaches a gradient.
    safe_a = torch.where(binds, torch.zeros_like(log_a), log_a)
    safe_b = torch.where(binds, torch.full_like(log_b, -math.inf), log_b)
    return torch.where(binds, floor, safe_a + _log1mexp(safe_b - safe_a))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0 (and x = −inf), accurately on both sides of −ln 2."""
    near_zero = x > -_LN2
    x_near = torch.where(near_zero, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near_zero, torch.full_like(x, -_LN2), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _negative_statistics(U, I, X, Y, users, items, x_ids, y_ids, interactions, options):
    """Per-row log-sums over the (true) negatives and their counts, chunked over rows.

    Args:
        U, I: ``[M, d]``; X, Y: ``[M·P, d]`` flattened pools; users, items: ``[M]``;
        x_ids, y_ids: ``[M·P]`` flattened pool ids.

    Returns:
        lse_A, lse_B, lse_C, lse_E: ``[M]`` log Σ e^score over Tᴵ (A, E) and Tᵁ (B, C), or over
        all negatives when ``debias`` is False; −inf where the set is empty.
        n_item, n_user: ``[M]`` int64 sizes |Tᴵ_k| and |Tᵁ_k|.
    """
    M, MP = U.shape[0], X.shape[0]
    rows_per_chunk = max(1, CHUNK_ELEMENTS // MP)
    use_checkpoint = torch.is_grad_enabled() and rows_per_chunk < M

    def chunk(r0, U_c, I_c, X, Y):
        return _chunk_statistics(
            U_c, I_c, X, Y, r0, M, users[r0 : r0 + U_c.shape[0]], items[r0 : r0 + U_c.shape[0]],
            x_ids, y_ids, interactions, options,
        )

    pieces = []
    for r0 in range(0, M, rows_per_chunk):
        args = (U[r0 : r0 + rows_per_chunk], I[r0 : r0 + rows_per_chunk], X, Y)
        if use_checkpoint:  # keep one chunk's [rows, M·P] activations alive, not all of them
            pieces.append(checkpoint(chunk, r0, *args, use_reentrant=False))
        else:
            pieces.append(chunk(r0, *args))
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def _chunk_statistics(U, I, X, Y, r0, M, users, items, x_ids, y_ids, interactions, options):
    """:func:`_negative_statistics` for the rows ``r0 .. r0 + R``; U, I, users, items hold them."""
    R, MP = U.shape[0], X.shape[0]
    P = MP // M
    inv_tau = 1.0 / options.temperature
    with torch.no_grad():
        rows = torch.arange(r0, r0 + R, device=U.device)
        owner = torch.arange(MP, device=U.device) // P
        negative = owner[None, :] != rows[:, None]  # [R, MP]
        if options.debias:
            item_fn = x_ids[None, :] == items[:, None]  # φᴵ: X_j is i_k, or (u_k, X_j) ∈ D
            user_fn = y_ids[None, :] == users[:, None]  # φᵁ: Y_j is u_k, or (Y_j, i_k) ∈ D
            if interactions is not None:
                item_fn |= interactions.contains(users[:, None], x_ids[None, :])
                user_fn |= interactions.contains(y_ids[None, :], items[:, None])
            true_item = negative & ~item_fn  # Tᴵ
            true_user = negative & ~user_fn  # Tᵁ
        else:
            true_item = true_user = negative
        n_item = true_item.sum(-1)
        n_user = true_user.sum(-1)

    A = U @ X.T * inv_tau  # [R, MP]
    B = I @ Y.T * inv_tau  # [R, MP]  (B[k, j] = f(Y_j, i_k))
    C = U @ Y.T * inv_tau  # [R, MP]
    E = I @ X.T * inv_tau  # [R, MP]
    return (
        _masked_logsumexp(A, true_item),
        _masked_logsumexp(B, true_user),
        _masked_logsumexp(C, true_user),
        _masked_logsumexp(E, true_item),
        n_item,
        n_user,
    )


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Σ_{mask} eˣ over the last dim; −inf (with zero gradient) where the mask is empty."""
    return torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=-1)
