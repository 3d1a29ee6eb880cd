"""hdccf_triton/LOSS.md written as literally as possible, one row and one column at a time, in Decimal.

An oracle independent of the library: no log-sum-exp, no masks, no vectorisation. Decimal
arithmetic (60 significant digits) holds e^{±500} exactly enough, so it is also the ground
truth for the large-score tests. Slow: tiny batches only.
"""

from __future__ import annotations

from decimal import Decimal, getcontext

getcontext().prec = 60


def rows(t):
    return [[Decimal(float(v)) for v in row] for row in t.detach().reshape(-1, t.shape[-1]).tolist()]


def dot(a, b):
    return sum((x * y for x, y in zip(a, b)), Decimal(0))


def norm(a):
    return max(dot(a, a).sqrt(), Decimal("1e-12"))


def naive_row_losses(
    user_emb, item_emb, pool_item_emb, pool_user_emb, users, items, pool_items, pool_users,
    pairs=(), temperature=0.1, omega_user=0.0, omega_item=0.0, lambda_user=1.0,
    lambda_item=1.0, similarity="dot", debias=True, extra_negatives=None, item_log_q=None, user_log_q=None,
):
    """Per-row loss of hdccf_triton/LOSS.md as a list of Decimals. ``pairs``: the training pairs D;
    ``extra_negatives``: (item_emb [B', d], user_emb [B', d], items [B'], users [B']) or None;
    ``item_log_q``, ``user_log_q``: the correction tables ℓ or None."""

    def f(a, b):
        if similarity == "cosine":
            return dot(a, b) / (norm(a) * norm(b))
        return dot(a, b)

    extra = None
    if extra_negatives is not None:
        xe, ye, ie, ue = extra_negatives
        extra = (rows(xe), rows(ye), ie.tolist(), ue.tolist())
    log_q = None
    if item_log_q is not None or user_log_q is not None:
        log_q = tuple(None if t is None else [Decimal(float(v)) for v in t.tolist()] for t in (item_log_q, user_log_q))
    return literal_row_losses(
        rows(user_emb), rows(item_emb), rows(pool_item_emb), rows(pool_user_emb), pool_item_emb.shape[1],
        users, items, pool_items, pool_users, f, f, pairs, temperature, omega_user, omega_item,
        lambda_user, lambda_item, debias, extra, log_q,
    )


def literal_row_losses(U, I, X, Y, P, users, items, pool_items, pool_users, f, f_aux, pairs,
                       temperature, omega_user, omega_item, lambda_user, lambda_item, debias, extra=None, log_q=None):
    """hdccf_triton/LOSS.md for Decimal row vectors U, I ``[M][·]`` and flattened pools X, Y ``[M·P][·]``, with
    f the user–item similarity (s, A, B) and f_aux that of the user–user and item–item terms.
    ``extra``: (XE, YE, item ids, user ids) of the mixed negatives or None; ``log_q``: (item
    table, user table) of Decimal corrections (either may be None) or None."""
    M = len(U)
    users, items = users.tolist(), items.tolist()
    x_ids, y_ids = pool_items.reshape(-1).tolist(), pool_users.reshape(-1).tolist()
    D = {(int(u), int(i)) for u, i in pairs}
    tau = Decimal(temperature)
    wu, wi = Decimal(omega_user), Decimal(omega_item)
    XE, YE, xe_ids, ye_ids = extra if extra is not None else ([], [], [], [])
    item_q, user_q = log_q if log_q is not None else (None, None)
    lq_item = (lambda v: item_q[v]) if item_q is not None else (lambda v: Decimal(0))  # noqa: E731
    lq_user = (lambda v: user_q[v]) if user_q is not None else (lambda v: Decimal(0))  # noqa: E731

    Q_aux = P * (M - 1)
    Q = Q_aux + len(XE)
    losses = []
    for k in range(M):
        s = f(U[k], I[k]) / tau
        sum_TU_B = sum_TI_A = sum_TU_C = sum_TI_E = Decimal(0)
        sum_neg_B = sum_neg_A = sum_neg_C = sum_neg_E = Decimal(0)
        own_B = own_A = Decimal(0)
        own_C, own_E = [], []
        nU = nI = nU_aux = nI_aux = 0
        for j in range(M * P):
            A = f(U[k], X[j]) / tau
            B = f(Y[j], I[k]) / tau
            C = f_aux(U[k], Y[j]) / tau
            E = f_aux(I[k], X[j]) / tau
            if j // P == k:
                own_A += A.exp()
                own_B += B.exp()
                own_C.append(C)
                own_E.append(E)
                continue
            # the sampling correction: every negative's score minus ℓ of its id
            A, E = A - lq_item(x_ids[j]), E - lq_item(x_ids[j])
            B, C = B - lq_user(y_ids[j]), C - lq_user(y_ids[j])
            sum_neg_A += A.exp()
            sum_neg_B += B.exp()
            sum_neg_C += C.exp()
            sum_neg_E += E.exp()
            phi_I = x_ids[j] == items[k] or (users[k], x_ids[j]) in D
            phi_U = y_ids[j] == users[k] or (y_ids[j], items[k]) in D
            if not phi_I:
                nI += 1
                nI_aux += 1
                sum_TI_A += A.exp()
                sum_TI_E += E.exp()
            if not phi_U:
                nU += 1
                nU_aux += 1
                sum_TU_B += B.exp()
                sum_TU_C += C.exp()
        for b in range(len(XE)):  # the mixed negatives: user–item term only
            A = f(U[k], XE[b]) / tau - lq_item(xe_ids[b])
            B = f(YE[b], I[k]) / tau - lq_user(ye_ids[b])
            sum_neg_A += A.exp()
            sum_neg_B += B.exp()
            if not (xe_ids[b] == items[k] or (users[k], xe_ids[b]) in D):
                nI += 1
                sum_TI_A += A.exp()
            if not (ye_ids[b] == users[k] or (ye_ids[b], items[k]) in D):
                nU += 1
                sum_TU_B += B.exp()
        if debias:
            floor = Q * (-1 / tau).exp()
            FU = (Q / ((1 - wu) * nU) * sum_TU_B) if nU else Decimal(0)
            FU -= Q * wu / ((1 - wu) * (P + 1)) * (s.exp() + own_B)
            FU = max(FU, floor)
            FI = (Q / ((1 - wi) * nI) * sum_TI_A) if nI else Decimal(0)
            FI -= Q * wi / ((1 - wi) * (P + 1)) * (s.exp() + own_A)
            FI = max(FI, floor)
            GU = Q_aux / Decimal(nU_aux) * sum_TU_C if nU_aux else Decimal(0)
            GI = Q_aux / Decimal(nI_aux) * sum_TI_E if nI_aux else Decimal(0)
        else:
            FU, FI, GU, GI = sum_neg_B, sum_neg_A, sum_neg_C, sum_neg_E
        L_ui = -s + (s.exp() + FU + FI).ln()
        L_uu = sum((-c + (c.exp() + GU).ln() for c in own_C), Decimal(0))
        L_ii = sum((-e + (e.exp() + GI).ln() for e in own_E), Decimal(0))
        losses.append(L_ui + Decimal(lambda_user) * L_uu + Decimal(lambda_item) * L_ii)
    return losses
