"""The embedding model's inference scores and the log-frequency prior."""

import math

import pytest
import torch

from hdccf_triton import ModulatedSimilarity
from hdccf_triton.models import EmbeddingModel, log_frequency_prior, select_prior_strength


SIMILARITIES = {
    "dot": lambda: "dot",
    "cosine": lambda: "cosine",
    "modulated": lambda: ModulatedSimilarity(4),
    "modulated-cosine": lambda: ModulatedSimilarity(4, normalize=True),
    "all-ones": lambda: ModulatedSimilarity.all_ones(4),
    "all-ones-cosine": lambda: ModulatedSimilarity.all_ones(4, normalize=True),
}


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_scores_are_the_similarity_of_the_embeddings(similarity):
    torch.manual_seed(0)
    model = EmbeddingModel(5, 7, 4, SIMILARITIES[similarity]()).double()
    with torch.no_grad():
        model.user_table.weight[1] = 0  # cosine: a clamped zero norm
    U, items = model.user_table.weight, model.item_table.weight
    if isinstance(model.similarity, ModulatedSimilarity):
        want = model.similarity(U[:, None], items[None])  # eq. 8 literally
    elif similarity == "cosine":
        want = torch.nn.functional.cosine_similarity(U[:, None], items[None], dim=-1, eps=1e-12)
    else:
        want = U @ items.T
    users = torch.tensor([4, 1, 0, 2])
    torch.testing.assert_close(model.score_all(users), want[users], rtol=1e-12, atol=1e-12)
    cand = torch.tensor([[6, 0], [3, 3], [1, 5], [2, 4]])
    torch.testing.assert_close(model.score(users, cand), torch.gather(want[users], 1, cand), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_item_prior_is_added_to_every_score(similarity):
    torch.manual_seed(0)
    sim = SIMILARITIES[similarity]()
    model = EmbeddingModel(5, 7, 4, sim)
    users, items = torch.tensor([0, 3]), torch.tensor([[1, 6], [0, 2]])
    raw, raw_all = model.score(users, items), model.score_all(users)
    torch.testing.assert_close(torch.gather(raw_all, 1, items), raw)
    prior = torch.arange(7, dtype=torch.float32) / 3
    model.set_item_prior(prior)
    torch.testing.assert_close(model.score(users, items), raw + prior[items])
    torch.testing.assert_close(model.score_all(users), raw_all + prior)
    assert torch.equal(model.state_dict()["item_prior"], prior)  # saved with the checkpoint
    model.set_item_prior(None)
    torch.testing.assert_close(model.score(users, items), raw)


def test_log_frequency_prior():
    train_items = torch.tensor([0, 0, 0, 2, 2, 3])
    prior = log_frequency_prior(train_items, 5, temperature=0.5)
    want = [0.5 * math.log(3), 0.0, 0.5 * math.log(2), 0.0, 0.0]  # unseen items count as 1
    torch.testing.assert_close(prior, torch.tensor(want))


def test_bad_priors_are_refused():
    model = EmbeddingModel(2, 3, 4)
    with pytest.raises(ValueError, match="prior: expected a tensor of shape"):
        model.set_item_prior(torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        model.set_item_prior(torch.tensor([0.0, math.inf, 0.0]))
    with pytest.raises(ValueError, match="temperature"):
        log_frequency_prior(torch.tensor([0]), 3, temperature=0.0)


class _PriorProbe:
    """An evaluator whose validation metric peaks where the model's prior equals `target`."""

    selection = ("sampled", "NDCG@10")

    def __init__(self, target):
        self.target, self.splits = target, []

    def evaluate(self, model, split, ks, protocols=None, item_offsets=None):
        self.splits.append(split)
        out = {}
        for key, offset in item_offsets.items():
            gap = float((model.item_prior + offset - self.target).abs().sum())
            out[key] = {"sampled": {"NDCG@10": 1.0 / (1.0 + gap)}, "full": {"NDCG@10": 0.0}}
        return out


def test_select_prior_strength_picks_the_best_validation_alpha_and_sets_it():
    model = EmbeddingModel(2, 3, 4)
    log_counts = torch.tensor([0.0, 1.0, 2.0])
    probe = _PriorProbe(0.5 * log_counts)
    alpha, scan = select_prior_strength(model, probe, log_counts, [0.0, 0.25, 0.5, 1.0])
    assert alpha == 0.5 and list(scan) == [0.0, 0.25, 0.5, 1.0] and scan[0.5] == 1.0
    assert set(probe.splits) == {"valid"}
    torch.testing.assert_close(model.item_prior, 0.5 * log_counts)
    # ties go to the first candidate (the full protocol's metric is 0 everywhere)
    alpha, _ = select_prior_strength(model, probe, log_counts, [0.3, 0.0], protocol="full")
    assert alpha == 0.3


def test_select_prior_strength_refuses_the_test_split_and_bad_grids():
    model, probe, log_counts = EmbeddingModel(2, 3, 4), _PriorProbe(torch.zeros(3)), torch.zeros(3)
    with pytest.raises(ValueError, match="split"):
        select_prior_strength(model, probe, log_counts, [0.0], split="test")
    with pytest.raises(ValueError, match="strengths"):
        select_prior_strength(model, probe, log_counts, [])
    with pytest.raises(ValueError, match="strengths"):
        select_prior_strength(model, probe, log_counts, [math.nan])
