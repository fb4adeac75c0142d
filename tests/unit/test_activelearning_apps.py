"""The radiology app's active learning parts on their own: strategies, MC dropout, scores."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from apps.api.activelearning import ImageSet, Order, ScoringInput, dice, mc_dropout
from apps.radiology.activelearning import DiceScoring, EpistemicScoring, TTAScoring
from services.common.apps import load_app
from services.datastore.sample_studies import synthetic_volume

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def app():
    return load_app("apps.radiology")


def test_strategies_declare_their_order(app) -> None:
    strategies = app.strategies
    assert strategies["first"].order is Order.FIRST and strategies["random"].order is Order.RANDOM
    assert (strategies["epistemic"].order, strategies["epistemic"].score_key) == (Order.SCORE, "epistemic_entropy")
    assert app.scoring_methods["dice"].images is ImageSet.LABELED
    # Every score strategy reads a key some scoring method writes.
    written = {method.score_key for method in app.scoring_methods.values()}
    assert {s.score_key for s in strategies.values() if s.order is Order.SCORE} <= written
    assert all(method.model in app.infer_tasks for method in app.scoring_methods.values())


def test_mc_dropout_turns_dropout_on_without_touching_weights_and_restores_it(app) -> None:
    network = app.infer_tasks["segmentation"].initial_network().eval()
    keys = list(network.state_dict())
    inputs = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        plain = network(inputs)
        with mc_dropout(network, 0.3):
            noisy = [network(inputs) for _ in range(2)]
        after = network(inputs)
    assert not torch.equal(noisy[0], noisy[1])  # stochastic passes differ
    assert torch.equal(plain, after)  # deterministic again afterwards
    assert list(network.state_dict()) == keys
    assert all(m.p == 0.0 for m in network.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError), mc_dropout(torch.nn.Linear(2, 2), 0.2):
        pass


def test_mc_dropout_uses_its_own_generator_and_only_the_calling_thread_sees_it(app) -> None:
    network = app.infer_tasks["segmentation"].initial_network().eval()
    inputs = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad(), ThreadPoolExecutor(1) as other_thread:
        plain = network(inputs)
        global_state = torch.random.get_rng_state()
        with mc_dropout(network, 0.3, seed=5):
            first = network(inputs)
            beside = other_thread.submit(network, inputs).result()  # a plain inference meanwhile
        assert torch.equal(torch.random.get_rng_state(), global_state)  # global generator untouched
        with mc_dropout(network, 0.3, seed=5):
            again = network(inputs)
    assert torch.equal(beside, plain)
    assert torch.equal(first, again) and not torch.equal(first, plain)


def test_scores_are_deterministic_and_finite(app) -> None:
    task = app.infer_tasks["segmentation"]
    network = task.initial_network().eval()
    image, label = synthetic_volume(np.random.default_rng(0), 24)
    item = ScoringInput(image, AFFINE, label, {"passes": 3})
    epistemic = EpistemicScoring()
    first, second = epistemic.score(task, network, "cpu", item), epistemic.score(task, network, "cpu", item)
    assert first == second and np.isfinite(first) and first > 0
    assert TTAScoring().score(task, network, "cpu", ScoringInput(image, AFFINE, params={"flips": 2})) >= 0
    value = DiceScoring().score(task, network, "cpu", item)
    assert 0.0 <= value <= 1.0
    with pytest.raises(ValueError):
        DiceScoring().score(task, network, "cpu", ScoringInput(image, AFFINE))
    with pytest.raises(ValueError):
        epistemic.score(task, network, "cpu", ScoringInput(image, AFFINE, params={"passes": 1}))


def test_dice() -> None:
    a = np.array([0, 1, 1, 2, 2, 0])
    assert dice(a, a, [1, 2]) == 1.0
    assert dice(a, np.zeros_like(a), [1]) == 0.0
    assert dice(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), [1]) == pytest.approx(2 / 3)
    assert dice(np.zeros(3), np.zeros(3), [1]) == 1.0
