"""End to end: `isles demo --quick` runs a bootstrap node, 2 volunteer processes and the aggregator on 127.0.0.1; the
published ensemble holds every expert and the router, and samples. Also: bad demo arguments fail with one line.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import ISLES

pytestmark = pytest.mark.slow


@pytest.mark.timeout(420)
def test_demo_quick_trains_every_unit_and_publishes_a_sampling_ensemble(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run(
        ISLES + ["demo", "--quick", "--experts", "2", "--work-dir", str(work), "--json"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    units = {u["unit"]: u for u in summary["units"]}
    assert sorted(units) == ["expert-0", "expert-1", "router"]
    assert all(u["state"] == "accepted" for u in units.values())
    assert summary["complete"] and summary["rejections"] == []
    # Both volunteers took part (each claims its own units; a lone one would take all of them only if the other died).
    assert {u["trained_by"] for u in units.values()} <= {"volunteer-0", "volunteer-1"}
    assert all(u["val_loss"] < u["threshold"] for u in units.values())
    assert (work / "samples.png").is_file()

    from isles.router.ensemble import EnsemblePipeline

    pipe = EnsemblePipeline.from_pretrained(summary["ensemble"], device="cpu")
    assert sorted(pipe.experts) == [0, 1] and pipe.missing == []
    images = pipe(n=6, class_labels=7, steps=5, seed=0).images
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all()
    # The store holds the same ensemble as a revision of the published repo.
    from isles.protocol.artifacts import open_store

    assert open_store(summary["store_uri"]).list_revisions(summary["repo"])[-1] == summary["revision"]


def test_demo_refuses_a_non_empty_work_dir(tmp_path):
    (tmp_path / "something").write_text("x")
    proc = subprocess.run(
        ISLES + ["demo", "--quick", "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: --work-dir") and "Hint:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(900)
def test_text_demo_trains_text_experts_through_the_swarm_and_follows_prompts(tmp_path):
    """`isles demo --text --quick`: captioned procedural items, PixArt experts conditioned on MiniLM caption
    embeddings, trained by 2 volunteer processes, verified and published by the aggregator; the prompt grid is
    written, and samples' colours follow their prompts."""
    work = tmp_path / "demo"
    proc = subprocess.run(
        ISLES + ["demo", "--text", "--quick", "--experts", "2", "--work-dir", str(work), "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["complete"] and summary["rejections"] == []
    assert all(u["state"] == "accepted" for u in summary["units"])
    assert (work / "prompts.png").is_file() and len(summary["prompts"]) == 8

    from diffusers import PixArtTransformer2DModel

    from isles.router.ensemble import EnsemblePipeline

    ensemble = summary["ensemble"]
    assert isinstance(PixArtTransformer2DModel.from_pretrained(f"{ensemble}/expert_0"), PixArtTransformer2DModel)
    pipe = EnsemblePipeline.from_pretrained(ensemble, device="cpu")
    assert pipe.conditioning == "text" and pipe.config["text_encoder"]["id"] == "minilm"
    out = pipe(prompt="a large red 3 in the center", n=2, steps=5, seed=0, guidance_scale=3.0)
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()

    # Colour is what a quick run learns first (`isles eval` reads colour back right ~0.95 of the time after it, chance
    # ~0.25): a red prompt gives redder pictures than a blue one.
    red = pipe(prompt="a large red circle in the center", n=8, steps=20, seed=1, guidance_scale=3.0).images
    blue = pipe(prompt="a large blue circle in the center", n=8, steps=20, seed=1, guidance_scale=3.0).images
    redness = lambda x: float((x[:, 0] - x[:, 2]).mean())  # noqa: E731
    assert redness(red) > redness(blue) + 0.3


@pytest.mark.timeout(900)
def test_video_demo_trains_clip_experts_through_the_swarm_and_publishes_clips(tmp_path):
    """`isles demo --video --quick`: procedural captioned clips, unet-frames experts (a diffusers UNet over the clip's
    frames stacked as channels) on MiniLM caption embeddings, trained by 2
    volunteer processes; the aggregator verifies each clip expert (config, hashes, held-out loss on clips) and
    publishes; the demo writes a GIF, an MP4 and a frame sheet of clips for fixed prompts."""
    from PIL import Image

    work = tmp_path / "demo"
    proc = subprocess.run(
        ISLES + ["demo", "--video", "--quick", "--work-dir", str(work), "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["complete"] and summary["rejections"] == []
    units = {u["unit"]: u for u in summary["units"]}
    assert sorted(units) == ["expert-0", "expert-1", "router"]
    assert all(u["state"] == "accepted" and u["val_loss"] < u["threshold"] for u in units.values())
    with Image.open(summary["clips_gif"]) as gif:
        assert gif.n_frames == 8
    assert (work / "samples.png").is_file() and len(summary["prompts"]) == 8

    from diffusers import UNet2DConditionModel

    from isles.router.ensemble import EnsemblePipeline

    ensemble = summary["ensemble"]
    expert_config = UNet2DConditionModel.load_config(f"{ensemble}/expert_0")  # a plain diffusers folder
    assert expert_config["_isles_frames"] == 8 and expert_config["in_channels"] == 3 * 8
    pipe = EnsemblePipeline.from_pretrained(ensemble, device="cpu")
    assert pipe.is_video and pipe.frames == 8 and pipe.conditioning == "text"
    out = pipe(prompt="a red 3 moving right", n=2, steps=4, seed=0, guidance_scale=3.0)
    assert out.images.shape == (2, 3, 8, 16, 16) and torch.isfinite(out.images).all()
