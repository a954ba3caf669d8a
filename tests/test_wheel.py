"""The wheel works outside the repository: `python -m build` makes a wheel and an sdist, a fresh venv in a temporary
folder gets torch and the wheel (nothing from the clone), and `isles --help`, `--version`, `presets` and
`demo --quick` run from a folder outside the clone, which stays empty. Run: pytest tests/test_wheel.py -q
(~4-5 min on 2 cores: ~1.5 min of pip install with a warm pip cache, ~1-2 min of demo). The venv's own
pip is used as it comes, as a newcomer's would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build on the development machines' disk; the rest comes from the package index
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "demo-out", "runs")


def run(args: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def venv_env(venv: Path) -> dict:
    """The environment of a user who activated `venv`: nothing of the clone's interpreter or paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(REPO)]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path):
    pytest.importorskip("build", reason="`python -m build` is not installed: pip install -e '.[dev]'")
    src, dist, venv, outside, demo = (tmp_path / d for d in ("src", "dist", "venv", "outside", "demo"))
    try:
        # 1. Build from a copy of the sources, so that the build writes nothing (egg-info, build/) into the clone.
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
        run([sys.executable, "-m", "build", "--outdir", dist, src], tmp_path, dict(os.environ), 600)
        wheels, sdists = list(dist.glob("isles-*.whl")), list(dist.glob("isles-*.tar.gz"))
        assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
        version = wheels[0].name.split("-")[1]
        # 2. A fresh venv outside the clone (no system site-packages): torch and the wheel.
        run([sys.executable, "-m", "venv", venv], tmp_path, venv_env(venv), 300)
        env = venv_env(venv)
        python, isles = venv / "bin" / "python", venv / "bin" / "isles"
        run([python, "-m", "pip", "install", "-q", TORCH, wheels[0]], tmp_path, env, 1200)
        # 3. Run it as a user would, from an empty folder outside the clone.
        outside.mkdir()
        where = run([python, "-c", "import isles.client; print(isles.client.__file__)"], outside, env, 60).stdout
        assert Path(where.strip()).is_relative_to(venv), where
        assert "demo" in run([isles, "--help"], outside, env, 60).stdout
        assert run([isles, "--version"], outside, env, 60).stdout == f"isles {version}\n"
        assert "unet-tiny" in run([isles, "presets"], outside, env, 120).stdout
        summary = run([isles, "demo", "--quick", "--work-dir", demo], outside, env, 600).stdout
        png = demo / "samples.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", summary
        assert "samples.png" in summary
        assert list(outside.iterdir()) == []
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1.7 GB; pytest keeps the last runs' tmp_path folders
