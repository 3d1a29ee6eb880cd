"""SPEC.md with the modulated similarity (eqs. 7-8), one pair at a time, in Decimal.

The companion of ``naive.py`` for ``similarity=ModulatedSimilarity``: no library code, no
split of g's weight, no chunks. g is applied to the literal concatenation [e_i ; e_u ; e_i⊙e_u]
and f(u, i) = (m ⊙ p_u)·(m ⊙ q_i) (cosine of the two with ``normalize``). Slow: tiny batches.
"""

from __future__ import annotations

from decimal import Decimal, getcontext

getcontext().prec = 60

_EPS = Decimal("1e-12")


def _rows(t):
    return [[Decimal(float(v)) for v in row] for row in t.detach().reshape(-1, t.shape[-1]).tolist()]


def _dot(a, b):
    return sum((x * y for x, y in zip(a, b)), Decimal(0))


def _norm(a):
    return max(_dot(a, a).sqrt(), _EPS)


def _sigmoid(x):
    return 1 / (1 + (-x).exp())


def naive_modulated_row_losses(
    user_emb, item_emb, pool_item_emb, pool_user_emb, users, items, pool_items, pool_users,
    weight, bias, pairs=(), temperature=0.1, omega_user=0.0, omega_item=0.0, lambda_user=1.0,
    lambda_item=1.0, normalize=False, debias=True,
):
    """Per-row loss (Decimals) with f the modulated similarity of g(x) = weight·x + bias.

    Embeddings end in 2·dim entries: users [p ‖ e], items [q ‖ e]; weight ``[dim, 3·dim]``,
    bias ``[dim]``; ``pairs``: the training pairs D.
    """
    d = weight.shape[0]
    W = _rows(weight)
    b = [Decimal(float(v)) for v in bias.detach().tolist()]
    U, I = _rows(user_emb), _rows(item_emb)
    X, Y = _rows(pool_item_emb), _rows(pool_user_emb)
    M, P = len(U), pool_item_emb.shape[1]
    users, items = users.tolist(), items.tolist()
    x_ids, y_ids = pool_items.reshape(-1).tolist(), pool_users.reshape(-1).tolist()
    D = {(int(u), int(i)) for u, i in pairs}
    tau = Decimal(temperature)
    wu, wi = Decimal(omega_user), Decimal(omega_item)

    def f(user, item):  # eqs. 7-8
        p, e_u = user[:d], user[d:]
        q, e_i = item[:d], item[d:]
        x = e_i + e_u + [a * c for a, c in zip(e_i, e_u)]  # [e_i ; e_u ; e_i ⊙ e_u]
        m = [_sigmoid(_dot(W[c], x) + b[c]) for c in range(d)]
        mp = [a * c for a, c in zip(m, p)]
        mq = [a * c for a, c in zip(m, q)]
        return _dot(mp, mq) / (_norm(mp) * _norm(mq)) if normalize else _dot(mp, mq)

    def f_plain(a, c):  # f_uu, f_ii on the p (q) halves
        a, c = a[:d], c[:d]
        return _dot(a, c) / (_norm(a) * _norm(c)) if normalize else _dot(a, c)

    Q = P * (M - 1)
    losses = []
    for k in range(M):
        s = f(U[k], I[k]) / tau
        sum_TU_B = sum_TI_A = sum_TU_C = sum_TI_E = Decimal(0)
        sum_neg_B = sum_neg_A = sum_neg_C = sum_neg_E = Decimal(0)
        own_B = own_A = Decimal(0)
        own_C, own_E = [], []
        nU = nI = 0
        for j in range(M * P):
            A = f(U[k], X[j]) / tau
            B = f(Y[j], I[k]) / tau
            C = f_plain(U[k], Y[j]) / tau
            E = f_plain(I[k], X[j]) / tau
            if j // P == k:
                own_A += A.exp()
                own_B += B.exp()
                own_C.append(C)
                own_E.append(E)
                continue
            sum_neg_A += A.exp()
            sum_neg_B += B.exp()
            sum_neg_C += C.exp()
            sum_neg_E += E.exp()
            if not (x_ids[j] == items[k] or (users[k], x_ids[j]) in D):
                nI += 1
                sum_TI_A += A.exp()
                sum_TI_E += E.exp()
            if not (y_ids[j] == users[k] or (y_ids[j], items[k]) in D):
                nU += 1
                sum_TU_B += B.exp()
                sum_TU_C += C.exp()
        if debias:
            floor = Q * (-1 / tau).exp()
            FU = (Q / ((1 - wu) * nU) * sum_TU_B) if nU else Decimal(0)
            FU -= Q * wu / ((1 - wu) * (P + 1)) * (s.exp() + own_B)
            FU = max(FU, floor)
            FI = (Q / ((1 - wi) * nI) * sum_TI_A) if nI else Decimal(0)
            FI -= Q * wi / ((1 - wi) * (P + 1)) * (s.exp() + own_A)
            FI = max(FI, floor)
            GU = Q / Decimal(nU) * sum_TU_C if nU else Decimal(0)
            GI = Q / Decimal(nI) * sum_TI_E if nI else Decimal(0)
        else:
            FU, FI, GU, GI = sum_neg_B, sum_neg_A, sum_neg_C, sum_neg_E
        L_ui = -s + (s.exp() + FU + FI).ln()
        L_uu = sum((-c + (c.exp() + GU).ln() for c in own_C), Decimal(0))
        L_ii = sum((-e + (e.exp() + GI).ln() for e in own_E), Decimal(0))
        losses.append(L_ui + Decimal(lambda_user) * L_uu + Decimal(lambda_item) * L_ii)
    return losses
