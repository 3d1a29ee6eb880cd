"""Every bad input gets a ValueError or TypeError that names the argument."""

import math

import pytest
import torch

from batches import make_batch
from hdccf_triton import (
    BackendUnavailableError,
    DebiasedContrastiveLoss,
    InteractionIndex,
    LossOptions,
    debiased_contrastive_loss,
)

NAMES = ["user_emb", "item_emb", "pool_item_emb", "pool_user_emb", "users", "items", "pool_items", "pool_users"]


def call(tensors, **kw):
    kw.setdefault("backend", "torch")
    return debiased_contrastive_loss(*tensors, **kw)


def replaced(b, name, value):
    tensors = list(b.tensors)
    tensors[NAMES.index(name)] = value
    return tensors


@pytest.fixture
def b():
    return make_batch(M=4, P=2, d=3, seed=0, dtype=torch.float32)


@pytest.mark.parametrize("name,shape", [
    ("user_emb", (4,)), ("item_emb", (4, 5)), ("item_emb", (3, 3)), ("pool_item_emb", (4, 3)),
    ("pool_item_emb", (5, 2, 3)), ("pool_item_emb", (4, 2, 4)), ("pool_user_emb", (4, 3, 3)),
])
def test_embedding_shapes(b, name, shape):
    with pytest.raises(ValueError, match=name):
        call(replaced(b, name, torch.zeros(shape)))


@pytest.mark.parametrize("name,shape", [("users", (3,)), ("items", (4, 1)), ("pool_items", (4, 3)), ("pool_users", (4,))])
def test_id_shapes(b, name, shape):
    with pytest.raises(ValueError, match=name):
        call(replaced(b, name, torch.zeros(shape, dtype=torch.int64)))


def test_empty_pool_and_batch(b):
    with pytest.raises(ValueError, match="P = 0"):
        call((b.user_emb, b.item_emb, torch.zeros(4, 0, 3), torch.zeros(4, 0, 3), b.users, b.items,
              torch.zeros(4, 0, dtype=torch.int64), torch.zeros(4, 0, dtype=torch.int64)))
    with pytest.raises(ValueError, match="M = 0"):
        call((torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 2, 3), torch.zeros(0, 2, 3),
              *(torch.zeros(s, dtype=torch.int64) for s in [(0,), (0,), (0, 2), (0, 2)])))


@pytest.mark.parametrize("name", NAMES[:4])
def test_embedding_dtypes(b, name):
    t = b.tensors[NAMES.index(name)]
    with pytest.raises(TypeError, match=name):
        call(replaced(b, name, t.to(torch.int64)))
    with pytest.raises(TypeError, match="share one dtype"):
        call(replaced(b, name, t.double()))


@pytest.mark.parametrize("name", NAMES[4:])
def test_float_ids(b, name):
    t = b.tensors[NAMES.index(name)]
    with pytest.raises(TypeError, match=name):
        call(replaced(b, name, t.float()))
    with pytest.raises(TypeError, match=name):
        call(replaced(b, name, t.bool()))


@pytest.mark.parametrize("name", NAMES[4:])
def test_negative_ids(b, name):
    t = b.tensors[NAMES.index(name)].clone()
    t.view(-1)[0] = -1
    with pytest.raises(ValueError, match=f"{name} must be non-negative"):
        call(replaced(b, name, t))


@pytest.mark.parametrize("name,limit", [("users", 7), ("pool_users", 7), ("items", 9), ("pool_items", 9)])
def test_ids_outside_the_index(b, name, limit):
    t = b.tensors[NAMES.index(name)].clone()
    t.view(-1)[-1] = limit
    with pytest.raises(ValueError, match=f"{name} holds id {limit}"):
        call(replaced(b, name, t), interactions=b.index)
    call(replaced(b, name, t))  # without an index any non-negative id is fine


def test_int32_ids_are_accepted(b):
    ids = [t.to(torch.int32) for t in b.tensors[4:]]
    want = call(b.tensors, interactions=b.index)
    torch.testing.assert_close(call((*b.embeddings, *ids), interactions=b.index), want)


@pytest.mark.parametrize("name", NAMES[:4])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_embeddings(b, name, bad):
    t = b.tensors[NAMES.index(name)].clone()
    t.view(-1)[1] = bad
    with pytest.raises(ValueError, match=f"{name} holds non-finite"):
        call(replaced(b, name, t))


def test_not_a_tensor(b):
    with pytest.raises(TypeError, match="items must be a torch.Tensor"):
        call(replaced(b, "items", [0, 1, 2, 3]))


def test_index_on_another_device_or_wrong_type(b):
    with pytest.raises(TypeError, match="interactions"):
        call(b.tensors, interactions={(0, 1)})
    with pytest.raises(TypeError, match="interactions"):
        DebiasedContrastiveLoss(interactions=[(0, 1)])
    meta = InteractionIndex(b.index.keys.to("meta"), 7, 9)
    with pytest.raises(ValueError, match="interactions is on meta"):
        call(b.tensors, interactions=meta)


def test_mismatched_devices(b):
    with pytest.raises(ValueError, match="pool_user_emb is on meta"):
        call(replaced(b, "pool_user_emb", b.pool_user_emb.to("meta")))


@pytest.mark.parametrize("kw,match,exc", [
    (dict(temperature=0.0), "temperature must be > 0", ValueError),
    (dict(temperature=-1), "temperature must be > 0", ValueError),
    (dict(temperature=math.nan), "temperature must be finite", ValueError),
    (dict(temperature="0.1"), "temperature must be a real number", TypeError),
    (dict(omega_user=1.0), r"omega_user must lie in \[0, 1\)", ValueError),
    (dict(omega_item=-0.1), r"omega_item must lie in \[0, 1\)", ValueError),
    (dict(lambda_user=-1.0), "lambda_user must be >= 0", ValueError),
    (dict(lambda_item=math.inf), "lambda_item must be finite", ValueError),
    (dict(similarity="euclid"), "similarity must be one of", ValueError),
    (dict(reduction="max"), "reduction must be one of", ValueError),
    (dict(backend="cuda"), "backend must be one of", ValueError),
    (dict(debias=1), "debias must be a bool", TypeError),
])
def test_bad_options(b, kw, match, exc):
    with pytest.raises(exc, match=match):
        call(b.tensors, **kw)
    with pytest.raises(exc, match=match):
        DebiasedContrastiveLoss(**kw)
    with pytest.raises(exc, match=match):
        LossOptions(**kw)


def test_unknown_module_option():
    with pytest.raises(TypeError, match="temprature"):
        DebiasedContrastiveLoss(temprature=0.1)


def test_triton_backend_on_cpu_tensors_says_why(b, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        call(b.tensors, backend="triton")


def test_auto_backend_on_cpu_uses_the_reference(b):
    torch.testing.assert_close(call(b.tensors, backend="auto"), call(b.tensors, backend="torch"))


def test_index_construction_errors():
    with pytest.raises(ValueError, match="same length"):
        InteractionIndex.from_pairs([0, 1], [0], 2, 2)
    with pytest.raises(TypeError, match="users must hold integer ids"):
        InteractionIndex.from_pairs(torch.tensor([0.0]), [0], 2, 2)
    with pytest.raises(ValueError, match=r"items must lie in \[0, 2\)"):
        InteractionIndex.from_pairs([0], [2], 2, 2)
    with pytest.raises(ValueError, match="num_users must be a positive int"):
        InteractionIndex.from_pairs([0], [0], 0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_that_would_overflow_are_refused_naming_the_cause(b, dtype):
    # finite embeddings of a diverged scale: the scores overflow the accumulation dtype, and the
    # loss would be NaN; a cosine of the same embeddings is fine
    scale = 1e30 if dtype == torch.float32 else 1e200
    tensors = [t.to(dtype) * scale for t in b.tensors[:4]] + list(b.tensors[4:])
    with pytest.raises(ValueError, match="the scores may overflow .* embeddings' scale has diverged"):
        debiased_contrastive_loss(*tensors, interactions=b.index, backend="torch")
    loss = debiased_contrastive_loss(*tensors, interactions=b.index, backend="torch", similarity="cosine")
    assert torch.isfinite(loss)
    # just below the bound: accepted and finite
    ok = [t.to(dtype) * 1e3 for t in b.tensors[:4]] + list(b.tensors[4:])
    assert torch.isfinite(debiased_contrastive_loss(*ok, interactions=b.index, backend="torch", temperature=1.0))
