"""hdccf_triton/LOSS.md with the modulated similarity (eqs. 7-8), one pair at a time, in Decimal.

The companion of ``naive.py`` for ``similarity=ModulatedSimilarity``: no library code, no
split of g's weight, no chunks. g is applied to the literal concatenation [e_i ; e_u ; e_i⊙e_u]
and f(u, i) = (m ⊙ p_u)·(m ⊙ q_i) (cosine of the two with ``normalize``). Slow: tiny batches.
"""

from __future__ import annotations

from decimal import Decimal

from naive import dot, literal_row_losses, norm, rows


def _sigmoid(x):
    return 1 / (1 + (-x).exp())


def naive_modulated_row_losses(
    user_emb, item_emb, pool_item_emb, pool_user_emb, users, items, pool_items, pool_users,
    weight, bias, pairs=(), temperature=0.1, omega_user=0.0, omega_item=0.0, lambda_user=1.0,
    lambda_item=1.0, normalize=False, debias=True, extra_negatives=None, item_log_q=None, user_log_q=None,
):
    """Per-row loss (Decimals) with f the modulated similarity of g(x) = weight·x + bias.

    Embeddings end in 2·dim entries: users [p ‖ e], items [q ‖ e]; weight ``[dim, 3·dim]``,
    bias ``[dim]``; ``pairs``: the training pairs D. ``extra_negatives``: the mixed negatives
    (item_emb ``[B′, 2·dim]`` ``[q ‖ e]``, user_emb ``[B′, 2·dim]`` ``[p ‖ e]``, items ``[B′]``,
    users ``[B′]``) or None; ``item_log_q``, ``user_log_q``: the tables of the sampling
    correction ℓ (one value per id) or None (hdccf_triton/LOSS.md, "Mixed negatives" and
    "Sampling-bias correction"; ``naive.literal_row_losses`` applies them).
    """
    d = weight.shape[0]
    W = rows(weight)
    b = [Decimal(float(v)) for v in bias.detach().tolist()]
    U, I = rows(user_emb), rows(item_emb)
    X, Y = rows(pool_item_emb), rows(pool_user_emb)

    def f(user, item):  # eqs. 7-8
        p, e_u = user[:d], user[d:]
        q, e_i = item[:d], item[d:]
        x = e_i + e_u + [a * c for a, c in zip(e_i, e_u)]  # [e_i ; e_u ; e_i ⊙ e_u]
        m = [_sigmoid(dot(W[c], x) + b[c]) for c in range(d)]
        mp = [a * c for a, c in zip(m, p)]
        mq = [a * c for a, c in zip(m, q)]
        return dot(mp, mq) / (norm(mp) * norm(mq)) if normalize else dot(mp, mq)

    def f_plain(a, c):  # f_uu, f_ii on the p (q) halves
        a, c = a[:d], c[:d]
        return dot(a, c) / (norm(a) * norm(c)) if normalize else dot(a, c)

    extra = None
    if extra_negatives is not None:
        xe, ye, ie, ue = extra_negatives
        extra = (rows(xe), rows(ye), ie.tolist(), ue.tolist())  # scored by f like X and Y
    log_q = None
    if item_log_q is not None or user_log_q is not None:
        log_q = tuple(None if t is None else [Decimal(float(v)) for v in t.tolist()] for t in (item_log_q, user_log_q))
    return literal_row_losses(
        U, I, X, Y, pool_item_emb.shape[1], users, items, pool_items, pool_users, f, f_plain, pairs,
        temperature, omega_user, omega_item, lambda_user, lambda_item, debias, extra, log_q,
    )
