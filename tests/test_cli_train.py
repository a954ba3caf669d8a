"""`isles train-expert`: trains, resumes in the same --out folder, and turns bad input into one error line."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import ISLES

from isles.client.cli.app import main
from isles.experts.data import ShardData, load_source, save_shard


def run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_expert_end_to_end_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    args = [*ISLES, "train-expert", "--data", "digits", "--steps", "3", "--batch", "8", "--out", str(out), "--json"]
    proc = subprocess.run(args + ["--grid", str(tmp_path / "grid.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["completed"] and result["step"] == 3 and result["metrics"]["val_loss"] > 0
    assert (out / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_running_again_resumes_from_the_newest_checkpoint(tmp_path, capsys):
    shard = load_source("digits").subset(torch.arange(40))
    path = tmp_path / "shard.safetensors"
    digest = save_shard(shard, path)
    common = ["train-expert", "--data", str(path), "--sha256", digest, "--batch", "4", "--out", str(tmp_path / "o")]
    code, out, err = run_cli([*common, "--steps", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 2
    code, out, err = run_cli([*common, "--steps", "4", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 4 and json.loads(out)["metrics"]["samples_seen"] == 16
    assert "resuming" in err
    code, out, err = run_cli([*common, "--steps", "4", "--lr", "0.5"], capsys)
    assert code == 1 and "Error:" in err and "different recipe" in err
    # Other data of the same shape and size (no --sha256 given) is not resumed into these weights.
    other = tmp_path / "other.safetensors"
    save_shard(ShardData(255 - shard.items, shard.labels, shard.clusters, shard.val_mask, shard.meta), other)
    plain = ["train-expert", "--batch", "4", "--steps", "1", "--out", str(tmp_path / "o2")]
    assert run_cli([*plain, "--data", str(path)], capsys)[0] == 0
    code, _, err = run_cli([*plain, "--data", str(other), "--steps", "2"], capsys)
    assert code == 1 and "different model or data" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data", "nowhere.safetensors"], "shard file not found"),
        (["--data", "digits", "--preset", "unet-huge"], "unknown model preset"),
        (["--data", "digits", "--preset", "dit-s-4", "--objective", "edm"], "unknown objective"),
        (["--data", "digits", "--steps", "0"], "invalid training recipe"),
        (["--data", "digits", "--preset", "dit-b-4", "--micro-batch", "0"], "micro-batch"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, extra, message):
    code, _, err = run_cli(["train-expert", "--out", str(tmp_path / "o"), *extra], capsys)
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 1 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_corrupt_shard_and_shape_mismatch(tmp_path, capsys):
    path = tmp_path / "shard.safetensors"
    digest = save_shard(load_source("digits").subset(torch.arange(10)), path)
    path.write_bytes(path.read_bytes()[:-20])
    code, _, err = run_cli(["train-expert", "--data", str(path), "--sha256", digest, "--out", str(tmp_path)], capsys)
    assert code == 1 and "corrupt" in err and "Traceback" not in err
    odd = ShardData(
        torch.zeros(4, 1, 7, 7, dtype=torch.uint8), None, torch.zeros(4, dtype=torch.long), torch.zeros(4).bool()
    )
    save_shard(odd, tmp_path / "odd.safetensors")
    code, _, err = run_cli(
        ["train-expert", "--data", str(tmp_path / "odd.safetensors"), "--out", str(tmp_path)], capsys
    )
    assert code == 1 and "even resolution" in err
    bad = load_source("digits").subset(torch.arange(10))
    bad.labels[3] = -1  # an embedding lookup would fail deep inside the model
    save_shard(bad, tmp_path / "bad.safetensors")
    code, _, err = run_cli(
        ["train-expert", "--data", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "b")], capsys
    )
    assert code == 1 and "labels range over -1..9" in err


def test_presets_table_as_json(capsys):
    code, out, _ = run_cli(
        ["presets", "--channels", "1", "--resolution", "8", "--num-classes", "10", "--json"], capsys
    )
    rows = {r["preset"]: r for r in json.loads(out)}
    assert code == 0 and rows["unet-tiny"]["parameters"] > 0 and "dit-xl-2" in rows
