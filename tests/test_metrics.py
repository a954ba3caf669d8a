"""FID and the other sample-quality metrics on small inputs, and the deterministic, cached feature network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from isles.protocol.errors import IslesError
from isles.router import features, metrics


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), eps=0.0)
    assert got == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_rotated_gaussians():
    # Same spectrum, rotated by 90 degrees: Tr(S1 + S2 - 2 sqrt(S1 S2)) with S2 = R S1 R^T.
    s1 = np.diag([4.0, 1.0])
    s2 = np.diag([1.0, 4.0])
    # sqrt(S1 S2) = diag(2, 2) -> trace 4; Tr S1 + Tr S2 = 10; FID = 10 - 8 = 2.
    assert metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=0.0) == pytest.approx(2.0, abs=1e-9)


def test_identical_sets_give_zero_and_samples_converge_to_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(20000, 8, generator=g) * 2 + 1  # N(1, 4 I) vs N(0, I): 8 * 1 + 8 * (2 - 1)^2 = 16
    z = torch.randn(20000, 8, generator=g)
    assert metrics.fid(y, z) == pytest.approx(16.0, rel=0.05)


def test_dead_units_stay_finite_with_eps():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g)
    y = torch.randn(50, 6, generator=g)
    x[:, :3] = 0.0  # dead units: a singular covariance
    y[:, :3] = 0.0
    value = metrics.fid(x, y, eps=1e-6)
    assert math.isfinite(value) and value >= 0.0


def test_feature_stats_needs_two_items():
    with pytest.raises(IslesError):
        metrics.feature_stats(torch.zeros(1, 4))
    with pytest.raises(IslesError):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_accuracy_entropy_diversity():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    assert metrics.class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
    assert metrics.class_entropy(logits, 2) == pytest.approx(1.0)
    assert metrics.class_entropy(logits[[0, 2]], 2) == pytest.approx(0.0)
    same = torch.ones(10, 4)
    assert metrics.diversity(same) == 0.0
    assert metrics.diversity(torch.eye(4)) == pytest.approx(math.sqrt(2))


def test_pixel_conversions_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(metrics.to_uint8(metrics.to_model_space(pixels)), pixels)


def test_inception_fid_without_the_extra_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fidelity(name, *args, **kwargs):
        if name == "torch_fidelity":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fidelity)
    with pytest.raises(IslesError) as info:
        metrics.inception_fid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert "isles[fid]" in (info.value.hint or "")


TINY = dict(resolution=16, train_items=1024, epochs=1, batch_size=64)


def test_feature_network_is_deterministic_and_cached(tmp_path):
    """The same spec gives the same weights whatever the caller's thread count (with 2 threads instead of 1 they once
    differed by 0.39, which moved a benchmark's FID floor from 2.91 to 2.60), and the caller's count is restored."""
    spec = features.procedural_spec(**TINY)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = features.load_or_train(spec, cache_dir=tmp_path / "a")
        torch.set_num_threads(2)
        b = features.load_or_train(spec, cache_dir=tmp_path / "b")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    cached = list((tmp_path / "a").glob("*.safetensors"))
    assert [p.name for p in cached] == [f"{spec.key()}.safetensors"]
    # A second call loads the cache instead of training: same weights, even with training data unavailable.
    c = features.load_or_train(spec, cache_dir=tmp_path / "a")
    assert torch.equal(c.embed.weight, a.embed.weight)
    # Another spec is another cache entry.
    assert features.procedural_spec(**{**TINY, "seed": 1}).key() != spec.key()


def test_fid_sanity_floor_below_model_below_noise(tmp_path):
    """Real vs real (disjoint halves) is the floor; noise is far above; blurred items lie in between."""
    from isles.experts import procedural

    net = features.load_or_train(features.procedural_spec(**TINY), cache_dir=tmp_path)
    x, _ = procedural.generate(800, stream="reference", resolution=16)
    real_a, real_b = metrics.to_model_space(x[:400]), metrics.to_model_space(x[400:])
    noise = torch.rand(400, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(real_b, 3, stride=1, padding=1)
    fa, _ = net.embed_all(real_a)
    floor = metrics.fid(fa, net.embed_all(real_b)[0])
    worse = metrics.fid(fa, net.embed_all(blurred)[0])
    worst = metrics.fid(fa, net.embed_all(noise)[0])
    assert floor < worse < worst
    assert worst > 5 * floor
    feats, logits = net.embed_all(real_a[:10])
    assert feats.shape == (10, 64) and logits.shape == (10, 18)
    assert (feats < 0).any()  # taken before the ReLU


def test_data_spec_keys_on_the_data():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    a = features.data_spec("digits", x, y, 10)
    b = features.data_spec("digits", x + 1, y, 10)
    assert a.key() != b.key() and a.channels == 1 and a.resolution == 8


def _tiny_ensemble(folder, objectives=("fm", "ddpm")):
    """An untrained 2-expert ensemble for 8x8 digits (10 classes): enough to exercise `isles eval` end to end."""
    from isles.experts.presets import build_model
    from isles.router.ensemble import EnsemblePipeline, Expert
    from isles.router.model import RouterModel, router_config

    torch.manual_seed(0)
    experts = {
        i: Expert(i, build_model("unet-tiny", 1, 8, 10), obj, {"data": {"source": "digits"}})
        for i, obj in enumerate(objectives)
    }
    router = RouterModel(router_config("cnn-tiny", len(objectives), 1, 8, 10))
    EnsemblePipeline(experts, router).save_pretrained(folder)
    return experts[0].model


def test_isles_eval_ensemble_rows_as_json(tmp_path):
    import json
    import subprocess

    from conftest import ISLES

    _tiny_ensemble(tmp_path / "ens")
    args = ["eval", str(tmp_path / "ens"), "--n", "40", "--steps", "2", "--routing", "top1", "--routing", "full"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--json", "--json-out", str(tmp_path / "eval.json")]
    args += ["--device", "cpu"]
    proc = subprocess.run(ISLES + args, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["data"] == "digits"  # recorded in the experts' expert.json
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    rows = {r["routing"]: r for r in result["rows"]}
    assert set(rows) == {"top1", "full"}
    assert rows["top1"]["expert_calls_per_sample"] == 2.0  # one expert per step
    assert rows["full"]["expert_calls_per_sample"] == 4.0  # both experts at both steps
    for row in rows.values():
        assert row["n"] == 40 and 0.0 <= row["accuracy"] <= 1.0
        assert row["fid"] > row["fid_floor"] >= 0.0  # an untrained model is far from real digits
        assert row["seconds_per_sample"] > 0


def test_isles_eval_single_expert_table_and_errors(tmp_path):
    import json
    import subprocess

    from conftest import ISLES

    from isles.experts.expert import export_expert

    model = _tiny_ensemble(tmp_path / "ens")
    export_expert(model, tmp_path / "expert", objective="fm", preset="unet-tiny", data_meta={"source": "digits"})
    args = ["eval", str(tmp_path / "expert"), "--n", "30", "--steps", "1", "--cache-dir", str(tmp_path / "c")]
    proc = subprocess.run(ISLES + args + ["--device", "cpu"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "single" in proc.stdout and "FID" in proc.stdout and "floor" in proc.stdout
    proc = subprocess.run(ISLES + ["eval", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Error:" in proc.stderr and "Hint:" in proc.stderr
    proc = subprocess.run(
        ISLES + ["eval", str(tmp_path / "ens"), "--routing", "sideways"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "unknown routing" in proc.stderr
    # Another ODE solver: Heun's 2 steps are 3 model calls a sample.
    args = ["eval", str(tmp_path / "expert"), "--n", "30", "--steps", "2", "--sampler", "heun", "--json"]
    proc = subprocess.run(ISLES + args + ["--cache-dir", str(tmp_path / "c"), "--device", "cpu"], capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["rows"][0]
    assert row["solver"] == "heun" and row["expert_calls_per_sample"] == 3.0


@pytest.mark.slow
def test_iso_flop_quick_writes_every_configuration(tmp_path):  # and issue 16's questions, and the sampler table
    """benchmarks/iso_flop.py --quick: both sides train on the same FLOPs; every configuration has mean and spread."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "iso_flop.py"

    def run_quick(out: Path, *extra: str):
        """`iso_flop.py --quick` into `out` (one feature-network cache for every run): its stdout and its JSON."""
        args = [sys.executable, str(script), "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                "--threads", "1", "--device", "cpu", *extra]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout, json.loads((out / "iso_flop_quick.json").read_text())

    stdout, result = run_quick(tmp_path)
    budget = result["monolith"]["train_flops"]
    for name in ("monolith", "top1", "top2", "full", "hetero", "all_fm", "random_shards"):
        row = result[name]
        assert row["fid_mean"] >= 0 and row["fid_std"] >= 0 and len(row["fid_per_seed"]) == 2
        assert abs(row["train_flops"] - budget) <= 0.05 * budget, name  # iso-FLOP, router included
    assert result["top1"]["expert_calls_per_sample"] < result["full"]["expert_calls_per_sample"]
    assert result["fid_floor"] < result["monolith"]["fid_mean"]
    for name in ("calibrated_top1", "hetero_calibrated", "hetero_chosen", "hetero_v_chosen", "proportional"):
        assert abs(result[name]["train_flops"] - budget) <= 0.05 * budget, name  # still iso-FLOP
    steps = [s["rows"]["proportional"]["steps"] for s in result["per_seed"]]
    assert all(sum(st) == 3 * result["per_seed"][0]["expert_steps"] and st[0] > st[-1] for st in steps), steps
    # The sweep covers the monolith too, so each side can be compared under its best solver.
    sweep = {(r["model"], r["solver"], r["steps"]): r for r in result["samplers"]}
    solvers = ("euler", "heun", "dpm++2m", "unipc")
    models = ("ensemble", "monolith", "proportional")
    assert set(sweep) == {(m, s, n) for m in models for s in solvers for n in (2, 4)}
    for model in models:
        assert sweep[(model, "heun", 4)]["expert_calls_per_sample"] == 7
        assert sweep[(model, "dpm++2m", 4)]["expert_calls_per_sample"] == 4
    # The monolith's Euler row is the monolith row itself at the same steps (the same samples).
    monolith_4 = [s["rows"]["monolith"]["fid"] for s in result["per_seed"]]
    assert sweep[("monolith", "euler", 4)]["fid_mean"] == pytest.approx(sum(monolith_4) / len(monolith_4), abs=1e-3)
    assert (tmp_path / "iso_flop_quick.png").stat().st_size > 1000
    assert (tmp_path / "iso_flop_quick_samplers.png").stat().st_size > 1000
    assert "| monolith | single |" in (tmp_path / "iso_flop_quick.md").read_text()
    assert "| monolith | heun | 4 | 7 |" in (tmp_path / "iso_flop_quick.md").read_text()
    assert "| monolith |" in stdout
    # --hetero-only: the hetero question alone, on the same experts as the full run's (same seed, same rows).
    _, only = run_quick(tmp_path / "hetero_only", "--seeds", "0", "--hetero-only", "yes")
    assert "monolith" not in only["configs"] and "proportional" not in only["configs"] and not only["samplers"]
    for name in ("all_fm", "hetero_chosen", "hetero_v_chosen_calibrated"):
        assert only[name]["fid_per_seed"][0] == pytest.approx(result[name]["fid_per_seed"][0], abs=1e-3), name
    # --hetero-ddpm 0 (the default-budget grid in the README): no DDPM expert is trained and no hetero row written;
    # the monolith and the proportional ensemble are the full run's.
    _, grid = run_quick(tmp_path / "no_hetero", "--seeds", "0", "--hetero-ddpm", "0", "--random-shards", "no",
                        "--sampler-steps", "2")  # fmt: skip
    assert not [name for name in grid["per_seed"][0]["rows"] if name.startswith("hetero")]
    for name in ("monolith", "all_fm", "proportional"):
        assert grid[name]["fid_per_seed"][0] == pytest.approx(result[name]["fid_per_seed"][0], abs=1e-3), name


def test_iso_flop_summary_averages_only_the_sampler_rows_every_seed_has():
    """A seed from an older run swept the all-FM ensemble only (no "model" key); merged with a newer seed that also
    swept the monolith, the summary keeps the ensemble's rows, averaged over both, and drops the monolith's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import iso_flop

    def seed(fids: dict) -> dict:
        row = {"solver": "unipc", "steps": 10, "expert_calls_per_sample": 10}
        rows = [{**row, **({"model": m} if m else {}), "fid": f} for m, f in fids.items()]
        return {"rows": {}, "curve": {"monolith": []}, "samplers": rows}

    newer, older = seed({"ensemble": 10.0, "monolith": 12.0}), seed({None: 14.0})
    ref = {"n": 8, "fid_floor": 1.0, "noise_fid": 100.0, "real_accuracy": 0.5}
    for order in ([newer, older], [older, newer]):
        out = iso_flop.summarise(iso_flop.BenchConfig(seeds=(0, 1)), order, ref, "cmd", 0.0)
        assert [(r["model"], r["fid_mean"]) for r in out["samplers"]] == [("ensemble", 12.0)]
