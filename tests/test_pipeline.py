"""EnsemblePipeline as a diffusers DiffusionPipeline: registered components, model_index.json beside ensemble.json,
`.to()`, progress bars and model CPU offload; loading reads ensemble.json alone, so a model_index.json naming other
code never makes anything run. Tiny float32 CPU models.
"""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from conftest import save_tiny_vae

from isles.protocol.errors import IslesError

STEPS = 3


def _pipeline(indices=(0, 1, 2), num_experts=3):
    from isles.experts.presets import build_model
    from isles.router.ensemble import EnsemblePipeline, Expert
    from isles.router.model import RouterConfig, RouterModel

    torch.manual_seed(0)
    experts = {i: Expert(i, build_model("unet-tiny", 1, 8, 10), "fm", {"note": i}) for i in indices}
    router = RouterModel(RouterConfig(num_experts=num_experts, in_channels=1, resolution=8, num_classes=10, width=8))
    return EnsemblePipeline(experts, router, {"name": "tiny"})


def _sample(pipe):
    return pipe(n=3, class_labels=[1, 4, 7], routing="top2", steps=STEPS, seed=5, guidance_scale=2.0).images


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def test_a_diffusion_pipeline_whose_components_are_the_router_and_present_experts():
    from diffusers import DiffusionPipeline, UNet2DModel

    from isles.router.model import RouterModel

    pipe = _pipeline(indices=(0, 2))
    assert isinstance(pipe, DiffusionPipeline)
    components = pipe.components
    assert set(components) == {"router", "expert_0", "expert_2"}  # expert 1 is missing: not registered
    assert isinstance(components["router"], RouterModel) and components["router"] is pipe.router
    assert isinstance(components["expert_2"], UNet2DModel) and components["expert_2"] is pipe.experts[2].model
    assert pipe.config == {"name": "tiny"}  # the ensemble's config, as before; the module index is model_index()
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.num_experts == 3 and pipe.missing == [1] and pipe.channels == 1 and pipe.resolution == 8


def test_save_writes_a_hashed_model_index_naming_every_component_and_round_trips(tmp_path):
    import diffusers

    from isles.protocol.files import sha256_file
    from isles.router.ensemble import EnsemblePipeline

    pipe = _pipeline(indices=(0, 2))
    manifest = pipe.save_pretrained(tmp_path / "ens")
    index_path = tmp_path / "ens" / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["_class_name"] == "EnsemblePipeline" and index["_diffusers_version"] == diffusers.__version__
    assert index["router"] == ["isles.router.model", "RouterModel"]
    assert index["expert_0"] == index["expert_2"] == ["diffusers", "UNet2DModel"] and "expert_1" not in index
    assert {k for k in index if not k.startswith("_")} == set(pipe.components)
    assert manifest["files"]["model_index.json"] == sha256_file(index_path)  # ensemble.json hashes it too
    again = pipe.save_pretrained(tmp_path / "again")
    assert again["files"] == manifest["files"]  # deterministic: the same ensemble publishes the same bytes

    loaded = EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")
    assert set(loaded.components) == {"router", "expert_0", "expert_2"} and loaded.config["name"] == "tiny"
    torch.testing.assert_close(_sample(loaded), _sample(pipe))


def test_to_moves_every_module_and_returns_the_pipeline():
    pipe = _pipeline()
    assert pipe.to("cpu") is pipe and pipe.to(device="cpu", dtype=torch.float32) is pipe
    moved = pipe.to(torch.device("meta"))  # a device with no data: shows that every module went
    assert moved is pipe and pipe.device == torch.device("meta")
    for name, module in pipe.components.items():
        assert all(p.device.type == "meta" for p in _params(module)), name
    with pytest.raises(IslesError, match="float32"):
        _pipeline().to(torch.float16)


def test_progress_bar_counts_steps_and_can_be_disabled(capsys):
    pipe = _pipeline()
    _sample(pipe)
    assert "it/s" not in capsys.readouterr().err  # off by default where stderr is not a terminal
    shown = io.StringIO()
    pipe.set_progress_bar_config(disable=False, file=shown)
    first = _sample(pipe)
    assert re.search(rf"\b{STEPS}/{STEPS}\b", shown.getvalue()), shown.getvalue()
    assert f"{STEPS + 1}/{STEPS}" not in shown.getvalue()
    hidden = io.StringIO()
    pipe.set_progress_bar_config(disable=True, file=hidden)
    torch.testing.assert_close(_sample(pipe), first)
    assert hidden.getvalue() == ""


def test_model_cpu_offload_without_accelerate_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: test_model_cpu_offload_swaps_experts covers offload")
    with pytest.raises(ImportError, match="accelerate"):
        _pipeline().enable_model_cpu_offload()


def test_model_cpu_offload_swaps_experts(monkeypatch):
    accelerate_hooks = pytest.importorskip("accelerate.hooks")

    pipe = _pipeline()
    expected = _sample(pipe)
    offloaded = []
    real_offload = accelerate_hooks.UserCpuOffloadHook.offload

    def offload(hook):
        offloaded.append(hook.model)
        real_offload(hook)

    monkeypatch.setattr(accelerate_hooks.UserCpuOffloadHook, "offload", offload)
    pipe.enable_model_cpu_offload(device="cpu")  # no accelerator here: the hooks' plumbing, on the CPU
    assert {id(h.model) for h in pipe._all_hooks} == {id(m) for m in pipe.components.values()}
    torch.testing.assert_close(_sample(pipe), expected)
    experts = [pipe.experts[i].model for i in range(3)]
    assert any(m is e for m in offloaded for e in experts)  # before each expert runs the others make way
    pipe.remove_all_hooks()


def _write_evil_code(folder):
    """Python a hostile repo could carry, and a model_index.json naming it (diffusers' custom-pipeline form)."""
    marker = folder / "EXECUTED"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass Evil: ...\n"
    (folder / "evil_module.py").write_text(code)
    (folder / "pipeline.py").write_text(code)
    index = {
        "_class_name": ["evil_module", "Evil"],
        "_diffusers_version": "0.42.1",
        "router": ["os", "system"],
        "expert_0": ["evil_module", "Evil"],
        "custom_pipeline": "pipeline",
        "trust_remote_code": True,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return marker


def test_a_model_index_naming_other_code_is_never_imported_or_run(tmp_path, monkeypatch):
    import hashlib
    import os
    import sys

    from isles.router.ensemble import EnsemblePipeline

    pipe = _pipeline()
    folder = tmp_path / "ens"
    pipe.save_pretrained(folder)
    marker = _write_evil_code(folder)
    monkeypatch.syspath_prepend(str(folder))  # even importable by name: still never imported
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail(f"os.system{a} was called"))

    # Tampered alone: its sha256 no longer matches ensemble.json, so the release is refused before anything loads.
    with pytest.raises(IslesError, match="model_index.json is corrupt"):
        EnsemblePipeline.from_pretrained(folder, device="cpu")

    # Re-hashed in ensemble.json too (a hostile publisher): loading reads ensemble.json only and works.
    path = folder / "ensemble.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["model_index.json"] = hashlib.sha256((folder / "model_index.json").read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))
    loaded = EnsemblePipeline.from_pretrained(folder, device="cpu")
    torch.testing.assert_close(_sample(loaded), _sample(pipe))
    assert not marker.exists() and "evil_module" not in sys.modules and "pipeline" not in sys.modules
    assert set(loaded.components) == {"router", "expert_0", "expert_1", "expert_2"}


def test_a_missing_model_index_or_corrupt_weights_are_still_named(tmp_path):
    from isles.router.ensemble import EnsemblePipeline

    _pipeline().save_pretrained(tmp_path / "ens")
    weights = tmp_path / "ens" / "router" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(IslesError, match="router .*corrupt"):
        EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")
    _pipeline().save_pretrained(tmp_path / "ens2")
    (tmp_path / "ens2" / "model_index.json").unlink()
    with pytest.raises(IslesError, match="model_index.json is missing"):
        EnsemblePipeline.from_pretrained(tmp_path / "ens2", device="cpu")


# --- a text-to-image ensemble on latents: the text encoder, tokenizer and VAE join the components when loaded ---


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory):
    from isles.experts.presets import build_model
    from isles.router.ensemble import EnsemblePipeline, Expert
    from isles.router.model import RouterConfig, RouterModel

    vae_folder = save_tiny_vae(tmp_path_factory.mktemp("vae"))
    experts = {i: Expert(i, build_model("pixart-tiny", 4, 8, text_width=384), "fm") for i in range(2)}
    router = RouterModel(RouterConfig(num_experts=2, in_channels=4, resolution=8, width=8))
    config = {
        "conditioning": "text",
        "data_kind": "latents",
        "text_encoder": {"id": "minilm", "revision": None, "width": 384, "max_length": 8},
        "vae": {
            "id": str(vae_folder),
            "revision": None,
            "scaling_factor": 0.5,
            "shift_factor": 0.0,
            "latent_channels": 4,
            "downsample": 2,
        },
    }
    return EnsemblePipeline(experts, router, config)


def test_text_encoder_and_vae_are_named_by_id_and_registered_once_loaded(text_pipeline, tmp_path):
    from diffusers import AutoencoderKL

    from isles.router.ensemble import EnsemblePipeline
    from isles.router.text_encoder import TextEncoder
    from isles.router.vae import LatentCodec

    pipe = text_pipeline
    manifest = pipe.save_pretrained(tmp_path / "ens")
    index = json.loads((tmp_path / "ens" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "AutoModel"] and index["tokenizer"][0] == "transformers"
    assert index["_isles"]["text_encoder"] == {"id": "minilm", "revision": None}
    assert index["_isles"]["vae"]["id"] == pipe.config["vae"]["id"]
    assert not any(p.startswith(("vae/", "text_encoder/", "tokenizer/")) for p in manifest["files"])  # not copied

    out = pipe(prompt="a red 3", n=2, steps=2, seed=0)
    assert out.images.shape == (2, 3, 16, 16) and out.latents.shape == (2, 4, 8, 8)
    components = pipe.components
    assert set(components) == {"router", "expert_0", "expert_1", "text_encoder", "tokenizer", "vae"}
    assert isinstance(components["vae"], AutoencoderKL) and components["vae"] is pipe.vae().vae
    assert isinstance(pipe.text_encoder(), TextEncoder) and isinstance(pipe.vae(), LatentCodec)  # the methods stay
    assert pipe.to("cpu") is pipe
    # Loading the saved folder gives the same samples (the text encoder and VAE found again by id).
    loaded = EnsemblePipeline.from_pretrained(tmp_path / "ens", device="cpu")
    again = loaded(prompt="a red 3", n=2, steps=2, seed=0)
    torch.testing.assert_close(again.latents, out.latents)
    loaded.to(torch.device("meta"))
    for name, module in loaded.components.items():
        if isinstance(module, torch.nn.Module):
            assert all(p.device.type == "meta" for p in _params(module)), name
