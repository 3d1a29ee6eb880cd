"""The modulated similarity (eqs. 7-8) in the PyTorch reference: the literal Decimal oracle,
gradcheck of every input (p, q, e, g's weight and bias), chunking, the all-ones ablation,
normalisation, the module's parameters, and bad inputs."""

import math

import pytest
import torch
from torch.func import functional_call

import hdccf_triton.backends.reference as reference
from batches import make_batch
from hdccf_triton import (
    BackendUnavailableError,
    DebiasedContrastiveLoss,
    LossOptions,
    ModulatedSimilarity,
    debiased_contrastive_loss,
)
from hdccf_triton.similarity import modulated_score_matrix, modulated_scores
from hdccf_triton.terms import LossInputs, prepare_scores
from naive_modulated import naive_modulated_row_losses

DEBIASED = dict(omega_user=0.2, omega_item=0.1, lambda_user=0.7, lambda_item=1.3)


def make_similarity(dim, normalize=False, *, seed=0, weight_scale=2.0, dtype=torch.float64):
    """A ModulatedSimilarity with weights large enough that m is far from constant."""
    torch.manual_seed(seed)
    sim = ModulatedSimilarity(dim, normalize).to(dtype)
    with torch.no_grad():
        sim.g.weight.mul_(weight_scale * math.sqrt(3 * dim))  # entries ~ U(−2, 2)
        sim.g.bias.normal_()
    return sim


def loss_of(b, sim, embeddings=None, *, chunk_elements=None, **kw):
    """The per-row loss of the reference; ``chunk_elements`` sets its chunks (the reference
    is then called directly, with the inputs as the public API would validate them)."""
    kw.setdefault("backend", "torch")
    kw.setdefault("reduction", "none")
    tensors = b.tensors if embeddings is None else b.with_embeddings(*embeddings)
    if chunk_elements is None:
        return debiased_contrastive_loss(*tensors, interactions=b.index, similarity=sim, **kw)
    options = LossOptions(similarity=sim, **kw)
    return reference.per_row_loss(LossInputs(*tensors), b.index, options, chunk_elements=chunk_elements)


# ---------------------------------------------------------------------------------------------
# The similarity itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_split_form_equals_the_literal_eq_8(normalize):
    sim = make_similarity(5, normalize)
    g = torch.Generator().manual_seed(1)
    users = torch.randn(4, 1, 10, generator=g, dtype=torch.float64)
    items = torch.randn(1, 6, 10, generator=g, dtype=torch.float64)
    literal = sim(users, items)  # [4, 6]: g on the concatenation [e_i ; e_u ; e_i ⊙ e_u]
    (p, e_u), (q, e_i) = sim.split(users), sim.split(items)
    split = modulated_scores(sim.parts(torch.float64), p, e_u, q, e_i, normalize)
    assert literal.shape == (4, 6)
    torch.testing.assert_close(split, literal, rtol=1e-13, atol=1e-13)
    # one pair by hand: f = Σ_c m_c² p_c q_c
    x = torch.cat([e_i[0, 2], e_u[1, 0], e_i[0, 2] * e_u[1, 0]])
    m = torch.sigmoid(sim.g.weight @ x + sim.g.bias)
    mp, mq = m * p[1, 0], m * q[0, 2]
    want = mp @ mq / (mp.norm() * mq.norm()) if normalize else (m * m * p[1, 0] * q[0, 2]).sum()
    torch.testing.assert_close(literal[1, 2], want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("max_elements", [1, 130, 1 << 22], ids=["row-by-row", "3-row-chunks", "one-chunk"])
def test_inference_score_matrix_equals_the_literal_eq_8(normalize, max_elements):
    sim = make_similarity(5, normalize)
    g = torch.Generator().manual_seed(2)
    users = torch.randn(7, 10, generator=g, dtype=torch.float64) * 3  # 7 rows: no chunk size divides it
    items = torch.randn(9, 10, generator=g, dtype=torch.float64) * 3
    users[2, :5] = 0  # a zero embedding: the normalised score's clamped norm
    items[4, :5] = 0
    literal = sim(users[:, None], items[None])  # [7, 9]
    (p, e_u), (q, e_i) = sim.split(users), sim.split(items)
    got = modulated_score_matrix(sim.parts(torch.float64), p, e_u, q, e_i, normalize, max_elements=max_elements)
    assert got.shape == (7, 9) and not got.requires_grad
    torch.testing.assert_close(got, literal, rtol=1e-13, atol=1e-13)
    assert literal[2].abs().max() == 0 and literal[:, 4].abs().max() == 0


def test_constructor_checks():
    with pytest.raises(ValueError, match="dim"):
        ModulatedSimilarity(0)
    with pytest.raises(ValueError, match="dim"):
        ModulatedSimilarity(2.0)
    with pytest.raises(TypeError, match="normalize"):
        ModulatedSimilarity(4, normalize=1)
    with pytest.raises(TypeError, match="modulate"):
        ModulatedSimilarity(4, modulate="no")
    assert ModulatedSimilarity.all_ones(4).g is None
    assert list(ModulatedSimilarity.all_ones(4).parameters()) == []
    assert [n for n, _ in ModulatedSimilarity(4).named_parameters()] == ["g.weight", "g.bias"]
    assert ModulatedSimilarity(4).g.weight.shape == (4, 12)


# ---------------------------------------------------------------------------------------------
# The loss against the literal oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("config", [
    dict(debias=True, **DEBIASED),
    dict(debias=True, omega_user=0.6, omega_item=0.7),  # the floor binds on some rows
    dict(debias=False, lambda_user=0.5, lambda_item=2.0),
], ids=["debiased", "floor", "biased"])
@pytest.mark.parametrize("use_index", [True, False], ids=["index", "identity-only"])
def test_matches_literal_oracle(normalize, config, use_index):
    b = make_batch(M=5, P=2, d=6, seed=3, scale=0.8)
    sim = make_similarity(3, normalize, seed=1)
    got = debiased_contrastive_loss(
        *b.tensors, interactions=b.index if use_index else None, similarity=sim,
        temperature=0.2, reduction="none", backend="torch", **config,
    )
    want = naive_modulated_row_losses(
        *b.tensors, sim.g.weight, sim.g.bias, pairs=b.pairs if use_index else (),
        temperature=0.2, normalize=normalize, **config,
    )
    torch.testing.assert_close(got, torch.tensor([float(w) for w in want], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_large_scores_match_the_oracle():
    # f of several units over τ = 0.01: scores beyond ±750, exp overflows float64 without the shift
    b = make_batch(M=4, P=2, d=8, seed=5, scale=2.5)
    sim = make_similarity(4, seed=2, weight_scale=0.5)
    got = loss_of(b, sim, temperature=0.01, **DEBIASED)
    scores = prepare_scores(LossInputs(*b.tensors), LossOptions(similarity=sim, temperature=0.01))
    assert scores.own_A.abs().max() > 750
    want = naive_modulated_row_losses(*b.tensors, sim.g.weight, sim.g.bias, pairs=b.pairs,
                                      temperature=0.01, **DEBIASED)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([float(w) for w in want], dtype=torch.float64),
                               rtol=1e-11, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


class _LossOfParameters(torch.nn.Module):
    """The loss as a function of g's parameters too, for gradcheck via functional_call."""

    def __init__(self, sim, batch, kw):
        super().__init__()
        self.sim, self.batch, self.kw = sim, batch, kw

    def forward(self, *embeddings):
        upstream = torch.linspace(0.3, 1.7, self.batch.users.numel(), dtype=torch.float64)
        return (loss_of(self.batch, self.sim, embeddings, **self.kw) * upstream).sum()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_gradcheck_every_input(normalize, debias, chunked):
    b = make_batch(M=4, P=2, d=6, seed=7, scale=0.7)
    sim = make_similarity(3, normalize, seed=3, weight_scale=1.0)
    kw = dict(temperature=0.5, debias=debias, **(DEBIASED if debias else {}))
    if chunked:  # chunks of 2 rows under checkpointing: N·P·pair_cost = 4·2·(2·3) entries a row
        kw["chunk_elements"] = 2 * 8 * 6
    fn = _LossOfParameters(sim, b, kw)
    embeddings = [t.detach().clone().requires_grad_() for t in b.embeddings]
    weight = sim.g.weight.detach().clone().requires_grad_()
    bias = sim.g.bias.detach().clone().requires_grad_()

    def f(W, bb, *emb):
        return functional_call(fn, {"sim.g.weight": W, "sim.g.bias": bb}, emb)

    assert torch.autograd.gradcheck(f, (weight, bias, *embeddings), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_chunked_equals_unchunked():
    b = make_batch(M=7, P=3, d=8, seed=11, scale=0.6)
    sim = make_similarity(4, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in b.embeddings]

    def run(chunk_elements):
        sim.zero_grad()
        for t in leaves:
            t.grad = None
        loss_of(b, sim, leaves, chunk_elements=chunk_elements, **DEBIASED).sum().backward()
        return [t.grad.clone() for t in leaves] + [sim.g.weight.grad.clone(), sim.g.bias.grad.clone()]

    whole = run(reference.CHUNK_ELEMENTS)
    chunked = run(2 * 21 * 8)  # 2 rows a chunk: N·P·pair_cost = 7·3·(2·4) entries a row
    for a, c in zip(whole, chunked):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


def test_only_the_used_halves_get_gradients():
    # A, B see p, q, e; C and E see p and q only: an e half is reached through m alone
    b = make_batch(M=4, P=2, d=6, seed=2)
    sim = make_similarity(3, seed=4)
    leaves = [t.detach().clone().requires_grad_() for t in b.embeddings]
    loss_of(b, sim, leaves, **DEBIASED).sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all() and (t.grad[..., :3] != 0).any() and (t.grad[..., 3:] != 0).any()
    assert (sim.g.weight.grad != 0).all() and (sim.g.bias.grad != 0).all()


# ---------------------------------------------------------------------------------------------
# The all-ones ablation, normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize,plain", [(False, "dot"), (True, "cosine")])
def test_all_ones_modulation_is_the_plain_similarity_exactly(normalize, plain):
    b = make_batch(M=6, P=3, d=8, seed=13, scale=0.9)
    halves = [t[..., :4].detach().clone().requires_grad_() for t in b.embeddings]
    full = [t.detach().clone().requires_grad_() for t in b.embeddings]
    kw = dict(interactions=b.index, backend="torch", reduction="none", **DEBIASED)
    want = debiased_contrastive_loss(*b.with_embeddings(*halves), similarity=plain, **kw)
    got = debiased_contrastive_loss(*b.with_embeddings(*full),
                                    similarity=ModulatedSimilarity.all_ones(4, normalize), **kw)
    assert torch.equal(got, want)
    upstream = torch.linspace(-0.5, 2.0, 6, dtype=torch.float64)
    g_want = torch.autograd.grad(want, halves, upstream)
    g_got = torch.autograd.grad(got, full, upstream)
    for a, w in zip(g_got, g_want):
        assert torch.equal(a[..., :4], w)
        assert torch.equal(a[..., 4:], torch.zeros_like(w))  # the factors are ignored


def test_all_ones_module_equals_dot():
    sim = ModulatedSimilarity.all_ones(3)
    g = torch.Generator().manual_seed(0)
    u, i = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    assert torch.equal(sim.modulation(u[:, 3:], i[:, 3:]), torch.ones(5, 3))
    torch.testing.assert_close(sim(u, i), (u[:, :3] * i[:, :3]).sum(-1))


def test_normalized_scores_lie_in_the_unit_interval_over_tau():
    tau = 0.1
    b = make_batch(M=6, P=3, d=16, seed=17, scale=3.0)
    sim = make_similarity(8, normalize=True, seed=6, weight_scale=3.0)
    options = LossOptions(similarity=sim, temperature=tau)
    s = prepare_scores(LossInputs(*b.tensors), options)
    rows, cols, scorer = sim.negative_scorer(s.U, s.I, s.X.reshape(18, 16), s.Y.reshape(18, 16))
    A, B, C, E = scorer(rows, cols, 1.0 / tau)
    bound = (1 + 1e-12) / tau
    for t in (s.s, s.own_A, s.own_B, s.own_C, s.own_E, A, B, C, E):
        assert t.abs().max() <= bound
    assert A.abs().max() > 0.5 / tau  # not trivially small
    # zero vectors: the clamped norms give 0, never NaN, and finite gradients
    zeros = [torch.zeros_like(t).requires_grad_() for t in b.embeddings]
    loss = loss_of(b, sim, zeros, temperature=tau)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(torch.isfinite(z.grad).all() for z in zeros)


# ---------------------------------------------------------------------------------------------
# The module API
# ---------------------------------------------------------------------------------------------


def test_loss_module_registers_the_similarity():
    sim = ModulatedSimilarity(3)
    loss_fn = DebiasedContrastiveLoss(None, similarity=sim, backend="torch")
    assert loss_fn.similarity is sim
    assert [n for n, _ in loss_fn.named_parameters()] == ["similarity.g.weight", "similarity.g.bias"]
    assert set(loss_fn.state_dict()) == {"similarity.g.weight", "similarity.g.bias"}
    assert "(similarity): ModulatedSimilarity(" in repr(loss_fn)
    loss_fn.double()  # converts the parameters in place: the options see the same module
    assert loss_fn.options.similarity.g.weight.dtype == torch.float64
    b = make_batch(M=4, P=2, d=6, seed=1)
    loss_fn(*b.tensors).backward()
    assert sim.g.weight.grad is not None and torch.isfinite(sim.g.weight.grad).all()
    # a plain similarity registers nothing
    assert list(DebiasedContrastiveLoss(similarity="cosine").parameters()) == []


def test_float32_parameters_with_float64_embeddings():
    # the parameters are cast (differentiably) to the computation's dtype
    b = make_batch(M=4, P=2, d=6, seed=4)
    sim64 = make_similarity(3, seed=8)
    sim32 = make_similarity(3, seed=8, dtype=torch.float32)
    loss = loss_of(b, sim32, **DEBIASED)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, loss_of(b, sim64.float().double(), **DEBIASED), rtol=1e-12, atol=1e-12)
    loss.sum().backward()
    assert sim32.g.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [3, 5, 8])
def test_last_dimension_must_be_twice_dim(width):
    b = make_batch(M=4, P=2, d=width, seed=0)
    with pytest.raises(ValueError, match=r"2·dim = 6 .*got a last dimension of " + str(width)):
        loss_of(b, ModulatedSimilarity(3).double())
    with pytest.raises(ValueError, match="2·dim"):
        loss_of(b, ModulatedSimilarity.all_ones(3))


def test_similarity_type_and_parameters_are_checked(monkeypatch):
    b = make_batch(M=4, P=2, d=6, seed=0)
    with pytest.raises(TypeError, match="similarity must be one of 'dot', 'cosine' or a ModulatedSimilarity"):
        loss_of(b, torch.nn.Linear(9, 3))
    with pytest.raises(ValueError, match="similarity must be one of"):
        loss_of(b, "modulated")
    sim = make_similarity(3)
    with torch.no_grad():
        sim.g.bias[1] = math.nan
    with pytest.raises(ValueError, match="similarity.g.bias holds non-finite"):
        loss_of(b, sim)
    with pytest.raises(ValueError, match="similarity.g.weight is on meta"):
        loss_of(b, ModulatedSimilarity(3).to("meta"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError):  # the kernels need CUDA (or the interpreter)
        loss_of(b, make_similarity(3), backend="triton")
