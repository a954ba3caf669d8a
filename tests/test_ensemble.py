"""Mixing is exact where it can be checked: analytic Gaussian-mixture experts + exact-posterior router give the exact
marginal velocity of the whole mixture; routing weights are correct; the sampler is seeded and deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from isles.protocol.errors import IslesError
from isles.router.sampling import (
    Routing,
    mixed_velocity,
    parse_routing,
    router_probabilities,
    routing_weights,
    sample_ensemble,
)

D = 4
MUS = torch.tensor([[0.5, 0.5, -0.3, 0.0], [-0.5, 0.2, 0.4, -0.4], [0.1, -0.6, 0.0, 0.5]], dtype=torch.float64)
SIGMAS = torch.tensor([0.1, 0.2, 0.15], dtype=torch.float64)
PIS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _cluster_stats(t: torch.Tensor, k: int):
    """x_t | k ~ N((1-t) mu_k, s_t^2 I) with s_t^2 = (1-t)^2 sigma_k^2 + t^2."""
    mean = (1 - t)[:, None] * MUS[k][None]
    var = (1 - t) ** 2 * SIGMAS[k] ** 2 + t**2
    return mean, var


def fm_expert(k: int):
    """The optimal flow-matching denoiser of cluster k: E[eps - x0 | x_t, k]."""

    def fn(x_t, t, labels):
        t = t.double()
        mean, var = _cluster_stats(t, k)
        resid = x_t.double() - mean
        e_eps = (t / var)[:, None] * resid
        e_x0 = MUS[k][None] + ((1 - t) * SIGMAS[k] ** 2 / var)[:, None] * resid
        return e_eps - e_x0

    return fn


def log_joint(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[B, K]: log pi_k + log N(x_t; (1-t) mu_k, s_t^2 I)."""
    cols = []
    for k in range(len(PIS)):
        mean, var = _cluster_stats(t.double(), k)
        sq = ((x_t.double() - mean) ** 2).sum(-1)
        cols.append(torch.log(PIS[k]) - 0.5 * sq / var - 0.5 * D * torch.log(2 * math.pi * var))
    return torch.stack(cols, dim=-1)


def exact_router(x_t, t, labels):
    return log_joint(x_t, t)  # softmax of these logits is the exact posterior p(k | x_t)


def marginal_velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Reference from the score of the whole mixture (autograd): v = (-t * grad log p_t(x) - x) / (1 - t)."""
    x = x_t.double().clone().requires_grad_(True)
    log_p = torch.logsumexp(log_joint(x, t), dim=-1).sum()
    (score,) = torch.autograd.grad(log_p, x)
    return (-t.double()[:, None] * score - x.detach()) / (1 - t.double())[:, None]


def _noisy_points(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    k = torch.multinomial(PIS, n, replacement=True, generator=g)
    x0 = MUS[k] + SIGMAS[k][:, None] * torch.randn(n, D, generator=g, dtype=torch.float64)
    eps = torch.randn(n, D, generator=g, dtype=torch.float64)
    return (1 - t)[:, None] * x0 + t[:, None] * eps, t


def test_full_mixture_of_optimal_experts_is_the_exact_marginal_velocity():
    x_t, t = _noisy_points(256)
    experts = [fm_expert(k) for k in range(3)]
    weights = routing_weights(router_probabilities(exact_router(x_t, t, None)), Routing("full"))
    v = mixed_velocity(experts, weights.double(), x_t, t).double()
    torch.testing.assert_close(v, marginal_velocity(x_t, t).float().double(), rtol=1e-5, atol=1e-5)


def test_top1_differs_from_the_marginal_where_clusters_overlap():
    x_t, t = _noisy_points(256)
    experts = [fm_expert(k) for k in range(3)]
    weights = routing_weights(router_probabilities(exact_router(x_t, t, None)), Routing("topk", k=1))
    v = mixed_velocity(experts, weights.double(), x_t, t).double()
    assert (v - marginal_velocity(x_t, t)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "spec,expected",
    [("top1", "top1"), ("top2", "top2"), ("topk:3", "top3"), ("full", "full"), ("threshold:0.2", "threshold:0.2")],
)
def test_parse_routing(spec, expected):
    assert str(parse_routing(spec)) == expected


@pytest.mark.parametrize("spec", ["top0", "best", "threshold:2", "topk:", ""])
def test_unknown_routing_mode_is_one_clear_error(spec):
    with pytest.raises(IslesError, match="unknown routing mode"):
        parse_routing(spec)


def test_routing_weights_select_and_sum_to_one():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    top1 = routing_weights(probs, parse_routing("top1"))
    assert torch.equal(top1, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    top2 = routing_weights(probs, parse_routing("top2"))
    torch.testing.assert_close(top2, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7]]))
    full = routing_weights(probs, parse_routing("full"))
    torch.testing.assert_close(full, probs)
    thr = routing_weights(probs, parse_routing("threshold:0.3"))
    torch.testing.assert_close(thr, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7]]))
    none_above = routing_weights(probs, parse_routing("threshold:0.9"))  # keeps the most probable one
    assert torch.equal(none_above, top1)
    for w in (top1, top2, full, thr):
        torch.testing.assert_close(w.sum(-1), torch.ones(2))


def test_partial_ensemble_renormalises_over_present_experts():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    probs = router_probabilities(logits, torch.tensor([False, True, True]))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.6, 0.4]]))
    with pytest.raises(IslesError, match="no experts"):
        router_probabilities(logits, torch.tensor([False, False, False]))


def test_sampler_is_seeded_deterministic_and_recovers_the_mixture():
    experts = [fm_expert(k) for k in range(3)]

    def run(seed, routing="full"):
        return sample_ensemble(
            experts,
            exact_router,
            (2000, D),
            steps=40,
            routing=routing,
            generator=torch.Generator().manual_seed(seed),
            return_routing=True,
        )

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.weights.shape == (40, 2000, 3) and a.choices.shape == (40, 2000)
    # Samples land near the cluster means with the mixture's proportions.
    nearest = torch.cdist(a.images.double(), MUS).argmin(-1)
    shares = torch.bincount(nearest, minlength=3).double() / 2000
    torch.testing.assert_close(shares, PIS, atol=0.05, rtol=0)
    partial = sample_ensemble(
        [None, experts[1], experts[2]],
        exact_router,
        (500, D),
        steps=20,
        routing="top1",
        generator=torch.Generator().manual_seed(0),
        return_routing=True,
    )
    assert (partial.choices != 0).all()
    assert torch.isfinite(partial.images).all()


def ddpm_expert(k: int):
    """The optimal eps-predictor of cluster k on the cosine VP schedule, converted to velocity by its objective."""
    from isles.experts.objectives import TIMESTEP_SCALE, cosine_alpha_bar, expert_velocity

    def model_fn(x_vp, timestep):
        ab = cosine_alpha_bar(timestep.double() / TIMESTEP_SCALE)[:, None]
        # x_vp = sqrt(ab) x0 + sqrt(1-ab) eps, x0 ~ N(mu_k, sigma_k^2): E[eps | x_vp] by Gaussian conditioning.
        var = ab * SIGMAS[k] ** 2 + (1 - ab)
        return (1 - ab).sqrt() / var * (x_vp.double() - ab.sqrt() * MUS[k][None])

    return lambda x_t, t, labels: expert_velocity("ddpm", model_fn, x_t.double(), t)


def test_flow_matching_and_ddpm_experts_mix_exactly_in_one_ensemble():
    x_t, t = _noisy_points(256, seed=3)
    experts = [fm_expert(0), ddpm_expert(1), fm_expert(2)]
    torch.testing.assert_close(experts[1](x_t, t, None).double(), fm_expert(1)(x_t, t, None), rtol=1e-4, atol=1e-4)
    weights = routing_weights(router_probabilities(exact_router(x_t, t, None)), Routing("full"))
    v = mixed_velocity(experts, weights.double(), x_t, t).double()
    torch.testing.assert_close(v, marginal_velocity(x_t, t), rtol=1e-4, atol=1e-4)


# --- EnsemblePipeline: save / load, verification, partial ensembles ----------------------------------------------


def _tiny_pipeline(indices=(0, 1, 2), num_experts=3, objectives=("fm", "ddpm", "fm")):
    from isles.experts.presets import build_model
    from isles.router.ensemble import EnsemblePipeline, Expert
    from isles.router.model import RouterConfig, RouterModel

    torch.manual_seed(0)
    experts = {
        i: Expert(i, build_model("unet-tiny", channels=1, resolution=8, num_classes=4), objectives[i], {"note": i})
        for i in indices
    }
    router = RouterModel(RouterConfig(num_experts=num_experts, in_channels=1, resolution=8, num_classes=4, width=8))
    return EnsemblePipeline(experts, router, {"name": "tiny"})


def test_save_load_round_trip_samples_identically(tmp_path):
    from isles.router.ensemble import EnsemblePipeline

    pipe = _tiny_pipeline()
    manifest = pipe.save_pretrained(tmp_path / "ens")
    assert {"expert_0/config.json", "expert_1/expert.json", "router/model.safetensors"} <= set(manifest["files"])
    assert "model_index.json" in manifest["files"]  # the diffusers view of the pipeline, hashed like the rest
    assert (tmp_path / "ens" / "expert_2" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")
    assert loaded.missing == [] and loaded.experts[1].objective == "ddpm" and loaded.num_classes == 4
    a = pipe(n=3, class_labels=2, routing="top2", steps=3, seed=5, guidance_scale=2.0)
    b = loaded(n=3, class_labels=2, routing="top2", steps=3, seed=5, guidance_scale=2.0)
    torch.testing.assert_close(a.images, b.images)
    assert a.images.shape == (3, 1, 8, 8)


def test_missing_or_corrupt_expert_is_named(tmp_path):
    import shutil

    from isles.router.ensemble import EnsemblePipeline

    _tiny_pipeline().save_pretrained(tmp_path / "ens")
    weights = tmp_path / "ens" / "expert_1" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(IslesError, match="expert 1 .*corrupt"):
        EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")
    shutil.rmtree(tmp_path / "ens" / "expert_1")
    with pytest.raises(IslesError, match="expert 1 .*missing"):
        EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")
    skipped = EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu", skip_broken=True)
    assert skipped.missing == [1]
    with pytest.raises(IslesError, match="not an ensemble folder"):
        EnsemblePipeline.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_malformed_ensemble_json_is_one_clear_error(tmp_path):
    import json

    from isles.router.ensemble import EnsemblePipeline

    _tiny_pipeline().save_pretrained(tmp_path / "ens")
    path = tmp_path / "ens" / "ensemble.json"
    manifest = json.loads(path.read_text())
    for broken in ([{"path": "expert_0"}], ["expert_0"], [{"index": "zero", "path": "expert_0", "objective": "fm"}]):
        path.write_text(json.dumps({**manifest, "experts": broken}))
        with pytest.raises(IslesError, match="ensemble.json is malformed"):
            EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")


def test_partial_ensemble_samples_without_the_missing_expert(tmp_path):
    from isles.router.ensemble import EnsemblePipeline

    _tiny_pipeline(indices=(0, 2)).save_pretrained(tmp_path / "ens")
    pipe = EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")
    assert pipe.missing == [1]
    for routing in ("top1", "top2", "full", "threshold:0.3"):
        out = pipe(n=4, class_labels=[0, 1, 2, 3], routing=routing, steps=3, seed=1, return_routing=True)
        assert torch.isfinite(out.images).all()
        assert (out.weights[:, :, 1] == 0).all()
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(3, 4))
    with pytest.raises(IslesError, match="out of range"):
        pipe(n=2, class_labels=9, steps=1)


def test_round_trip_through_a_local_store(tmp_path):
    from isles.protocol.artifacts import open_store
    from isles.router.ensemble import EnsemblePipeline

    pipe = _tiny_pipeline()
    pipe.save_pretrained(tmp_path / "ens")
    store = open_store(tmp_path / "store")
    revision = store.publish("tiny-ensemble", tmp_path / "ens", kind="model", message="ensemble")
    loaded = EnsemblePipeline.from_pretrained("tiny-ensemble", store=store, cache_dir=tmp_path / "cache", device="cpu")
    assert loaded.missing == []
    a, b = pipe(n=2, steps=2, seed=3), loaded(n=2, steps=2, seed=3)
    torch.testing.assert_close(a.images, b.images)
    assert revision in store.list_revisions("tiny-ensemble")


def test_guidance_is_applied_per_expert_before_mixing():
    from isles.router.sampling import guided

    null = 9

    def expert(scale):  # velocity depends on the class: v = scale * (x + label)
        return lambda x, t, labels: scale * (x + labels.float()[:, None])

    x, t = torch.ones(2, 3), torch.full((2,), 0.5)
    labels = torch.tensor([1, 2])
    w = 3.0
    experts = [guided(expert(1.0), w, null), guided(expert(2.0), w, null)]
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    v = mixed_velocity(experts, weights, x, t, labels)
    for k, scale in enumerate((1.0, 2.0)):  # each expert: v_null + w (v_c - v_null)
        cond = scale * (x + labels.float()[:, None])
        uncond = scale * (x + null)
        v_k = uncond + w * (cond - uncond)
        v = v - weights[:, k : k + 1] * v_k
    torch.testing.assert_close(v, torch.zeros_like(v))
    assert guided(expert(1.0), 1.0, null) is not None  # scale 1: the expert as it is
