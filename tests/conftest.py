"""Shared fixtures: small CPU budgets, child processes that are always reaped, and a free loopback address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Two cores on CI: keep torch from oversubscribing when several peers or trainers run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start a child process (its own process group, output to a log file); every one is killed at teardown."""
    children: list[subprocess.Popen] = []

    def _spawn(args: list[str], name: str = "child", env: dict | None = None, **kwargs) -> subprocess.Popen:
        log = open(tmp_path / f"{name}-{len(children)}.log", "w+b")  # noqa: SIM115 (closed by the reaper)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True, **kwargs
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        proc._log_file = log  # type: ignore[attr-defined]
        children.append(proc)
        return proc

    yield _spawn
    for proc in children:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        proc._log_file.close()  # type: ignore[attr-defined]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2, message: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def read_log(proc: subprocess.Popen) -> str:
    with open(proc.log_path, "rb") as f:  # type: ignore[attr-defined]
        return f.read().decode(errors="replace")


ISLES = [sys.executable, "-m", "isles.client.cli.app"]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"  # every peer the tests start listens on loopback only


def aggregate_once(peer: str, run_id: str, folder: Path, *extra: str, env: dict | None = None) -> dict:
    """Run `isles aggregate --once --json` as its own process on loopback, files under `folder`; its summary."""
    proc = subprocess.run(
        ISLES
        + ["aggregate", "--peers", peer, "--host-maddrs", LOOPBACK, "--run", run_id, "--once", "--json"]
        + ["--work-dir", str(folder / "work"), "--identity", str(folder / "identity"), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def save_tiny_vae(folder: Path, **overrides) -> Path:
    """A small random diffusers AutoencoderKL (16x16 RGB <-> 4x8x8 latents) saved to `folder`: the latent path's
    tests need a real VAE, and nothing can be downloaded."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (16, 32),
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": 16,
        "scaling_factor": 0.5,
    }
    AutoencoderKL(**{**config, **overrides}).save_pretrained(folder)
    return folder


def save_tiny_video_vae(folder: Path) -> Path:
    """A small random diffusers AutoencoderKLWan (Wan 2.1's video VAE) saved to `folder`: RGB clips of 1 + 4k frames
    <-> 4 channels x (1 + 2k) latent frames at a quarter of the side, with per-channel latent statistics as Wan's."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[0.5, 0.7, 1.2, 0.9],
    ).save_pretrained(folder)  # fmt: skip
    return folder
