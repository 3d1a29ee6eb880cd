"""The embedding model's inference scores and the log-frequency prior."""

import math

import pytest
import torch

from hdccf_triton import ModulatedSimilarity
from hdccf_triton.models import EmbeddingModel, log_frequency_prior


@pytest.mark.parametrize("similarity", ["dot", "cosine", "modulated"])
def test_item_prior_is_added_to_every_score(similarity):
    torch.manual_seed(0)
    sim = ModulatedSimilarity(4) if similarity == "modulated" else similarity
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
