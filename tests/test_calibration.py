"""Calibrated mixing (router/calibration.py): weights sum to one, reduce to the router's where every expert is equally
reliable, move weight toward the expert that measured better at the current t; the profile an expert publishes is
its held-out velocity error per noise level; an ensemble without profiles refuses calibrated routing clearly.
Run: pytest tests/test_calibration.py -q
"""

from __future__ import annotations

import pytest
import torch

from isles.protocol.errors import IslesError
from isles.router.calibration import Reliability, calibrated_probabilities, check_profile
from isles.router.sampling import Routing, parse_routing, router_probabilities, routing_weights


def test_calibrated_weights_sum_to_one_and_reduce_to_the_routers_when_experts_are_equally_reliable():
    probs = router_probabilities(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
    t = torch.rand(64, generator=torch.Generator().manual_seed(1))
    equal = Reliability([[0.5, 0.2, 0.1]] * 4)  # the same profile for every expert, whatever its shape over t
    torch.testing.assert_close(calibrated_probabilities(probs, equal.at(t)), probs)
    uneven = Reliability([[1.0, 1.0], [4.0, 0.25], [2.0, 2.0], [1.0, 3.0]])
    weights = calibrated_probabilities(probs, uneven.at(t))
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))
    assert (weights >= 0).all()
    for routing in ("calibrated", "calibrated:top1", "calibrated:top2"):
        mode = parse_routing(routing)
        torch.testing.assert_close(routing_weights(weights, mode).sum(-1), torch.ones(64))


def test_weight_moves_toward_the_expert_that_measured_better_at_that_noise_level():
    # Expert 1 is four times worse than expert 0 at high noise and four times better at low noise.
    reliability = Reliability([[1.0, 1.0], [0.25, 4.0]])
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    weights = calibrated_probabilities(probs, reliability.at(torch.tensor([0.05, 0.95])))
    torch.testing.assert_close(weights, torch.tensor([[0.2, 0.8], [0.8, 0.2]]))
    # Between bin centres the reliability is linear in t: halfway, the mse is the mean of the two bins'.
    torch.testing.assert_close(
        reliability.at(torch.tensor([0.5])), torch.tensor([[1.0, 1 / 2.125]], dtype=torch.float64)
    )


def test_parse_calibrated_routings():
    assert parse_routing("calibrated") == Routing("full", calibrated=True)
    assert parse_routing("calibrated:top2") == Routing("topk", k=2, calibrated=True)
    assert (
        str(parse_routing("calibrated:top1")) == "calibrated:top1" and str(parse_routing("calibrated")) == "calibrated"
    )
    for bad in ("calibrated:", "calibrated:calibrated", "calibrated:top0"):
        with pytest.raises(IslesError, match="unknown routing"):
            parse_routing(bad)


def test_published_profiles_are_validated():
    assert check_profile([0.5, 1, 2.0], "expert 0") == [0.5, 1.0, 2.0]
    for bad in ([], [1.0] * 101, [float("nan")], [-1.0], "0.5", [float("inf")], [True, "x"]):
        with pytest.raises(IslesError, match="velocity_mse_by_t"):
            check_profile(bad, "expert 0")


def test_an_experts_profile_is_its_held_out_velocity_error_by_noise_level():
    from isles.experts.data import load_source
    from isles.experts.expert import ExpertTask

    digits = load_source("digits")
    shard = digits.subset(torch.arange(200))
    shard.val_mask = torch.arange(200) % 4 == 0
    task = ExpertTask(shard, preset="unet-tiny", objective="ddpm")
    torch.manual_seed(0)
    model = task.build_model()
    first = task.velocity_errors(model, torch.device("cpu"), bins=5)
    assert len(first) == 5 and all(v > 0 for v in first)
    assert task.velocity_errors(model, torch.device("cpu"), bins=5) == first  # fixed draws: reproducible
    # An untrained DDPM expert converted to velocity is worst at high noise, where x0_hat carries eps_hat's error
    # times t / (1 - t): what calibrated mixing is there to discount.
    assert first[-1] > first[0]


def test_calibrated_sampling_needs_published_profiles(tmp_path):
    from test_ensemble import _tiny_pipeline

    from isles.router.calibration import PROFILE_KEY

    pipe = _tiny_pipeline()
    with pytest.raises(IslesError, match="no measured velocity error") as info:
        pipe(n=2, class_labels=[0, 1], routing="calibrated:top1", steps=2)
    assert "top1" in info.value.hint
    for i, expert in pipe.experts.items():
        expert.meta[PROFILE_KEY] = [1.0 + i, 2.0, 3.0]
    pipe.save_pretrained(tmp_path / "ens")
    from isles.router.ensemble import EnsemblePipeline

    loaded = EnsemblePipeline.from_pretrained(tmp_path / "ens")  # the profiles travel with the ensemble
    a = loaded(n=2, class_labels=[0, 1], routing="calibrated:top1", steps=3, solver="heun", return_routing=True)
    b = pipe(n=2, class_labels=[0, 1], routing="calibrated:top1", steps=3, solver="heun", return_routing=True)
    torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=0)  # saved weights: float rounding only
    assert a.weights.shape == (5, 2, 3)  # Heun: 2 x 3 - 1 calls
