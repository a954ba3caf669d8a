"""`isles demo`: the whole system on one machine, each role its own process on 127.0.0.1, with a local store.

Partition digits -> bootstrap node with the manifest -> N volunteers (`isles join`) + the aggregator (`isles aggregate
--until-complete`) -> sample a grid from the published ensemble -> a summary. Run: `isles demo --quick`.
`isles demo --text`: the same with the captioned procedural set, text-conditioned PixArt experts and the offline
MiniLM text encoder, then a grid with one labelled row per prompt. `isles demo --video`: text-to-video (Paris 2.0) on
the procedural video set with Wan experts, then a GIF and a frame sheet of clips for fixed prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isles.protocol.errors import IslesError

JOIN_LINE = re.compile(r"--peers\s+(\S+/p2p/\S+)")


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes of one demo run; `quick` fits in under 2 minutes on 2 CPU cores, `full` in under 10."""

    experts: int
    volunteers: int
    preset: str
    expert_steps: int
    router_steps: int
    global_batch: int
    lr: float
    warmup_steps: int
    ema_decay: float
    router_preset: str
    checkpoint_period: float  # seconds between checkpoint pushes
    lease_ttl: float
    heartbeat_period: float
    settle_period: float
    sample_steps: int
    timeout: float  # the whole demo gives up after this many seconds
    source: str = "digits"
    resolution: int | None = None  # default: the source's own
    conditioning: str | None = None  # None: class labels (digits); "text": captions
    text_encoder: str = "minilm"  # the offline encoder: nothing is downloaded
    text_max_length: int = 16  # procedural captions are at most 13 tokens with [CLS] and [SEP]
    guidance: float = 3.0  # classifier-free guidance of the prompt grid
    frames: int | None = None  # video: frames per clip


QUICK = DemoRecipe(4, 2, "unet-tiny", 150, 150, 32, 1e-3, 10, 0.99, "cnn-tiny", 10.0, 8.0, 2.0, 1.0, 20, 300.0)
FULL = DemoRecipe(4, 2, "unet-tiny", 600, 400, 48, 1e-3, 20, 0.995, "cnn-small", 30.0, 20.0, 5.0, 2.0, 30, 1200.0)
# Text: captioned procedural items at 16x16 (PixArt-tiny sees 64 patches), 2 experts, 2 volunteers; the full one is
# the README's reported run (~35 min on 2 cores), the quick one ~4 min.
TEXT_QUICK = dataclasses.replace(
    QUICK, experts=2, preset="pixart-tiny", expert_steps=150, source="procedural:4000", resolution=16,
    conditioning="text", timeout=900.0,
)  # fmt: skip
TEXT_FULL = dataclasses.replace(
    FULL, experts=2, preset="pixart-tiny", expert_steps=1200, router_steps=600, global_batch=64, lr=1e-3,
    ema_decay=0.998, source="procedural:20000", resolution=16, conditioning="text", timeout=3600.0,
)  # fmt: skip


# Video: procedural clips (digits and shapes moving, growing, changing colour), unet-frames-tiny experts (a 2D UNet
# over the clip's frames stacked as channels: on a CPU budget it learns motion, which wan-tiny does not). The quick one
# is 8 frames of 16x16, ~5 min; the full one 8 frames of 32x32 (~1 h): the procedural motions rendered over 8 frames,
# what unet-frames-tiny's 32 channels hold (24 stacked; 16 frames would be 48, which it cannot represent).
VIDEO_QUICK = dataclasses.replace(
    QUICK, experts=2, preset="unet-frames-tiny", expert_steps=150, router_steps=150, global_batch=16, lr=1e-3,
    source="procedural-video:600", resolution=16, frames=8, conditioning="text", timeout=1200.0,
)  # fmt: skip
VIDEO_FULL = dataclasses.replace(
    FULL, experts=2, preset="unet-frames-tiny", expert_steps=2400, router_steps=600, global_batch=16, lr=1e-3,
    ema_decay=0.998, source="procedural-video:8000", resolution=32, frames=8, conditioning="text", timeout=7200.0,
)  # fmt: skip


@dataclass(frozen=True)
class DemoConfig:
    work_dir: Path
    recipe: DemoRecipe
    experts: int
    volunteers: int
    seed: int = 0
    echo: bool = True  # copy the children's output to our stderr, prefixed with their name


def isles_command() -> list[str]:
    """How to start another `isles` process: this interpreter, so the demo works from a venv without PATH."""
    return [sys.executable, "-m", "isles.client.cli.app"]


class Child:
    """A role in its own process; its output goes to a log file and, prefixed, to our stderr."""

    def __init__(self, name: str, args: list[str], log_dir: Path, echo: Callable[[str], None] | None, env: dict):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.lines: list[str] = []
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed by the reader thread)
        self.proc = subprocess.Popen(
            isles_command() + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )
        self._echo = echo
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._log.write(line + "\n")
            self._log.flush()
            if self._echo is not None:
                self._echo(f"{self.name:>10} | {line}")
        self._log.close()

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_output(self, timeout: float) -> None:
        self._reader.join(timeout)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (a volunteer hands its unit back), then SIGKILL after `grace` seconds."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _child_env() -> dict:
    # Several trainers share the cores: one thread each avoids oversubscription; no stdout buffering so logs stream.
    # ISLES_DIE_WITH_PARENT: a demo killed outright (kill -9) takes its roles, and theirs, with it.
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1", "ISLES_DIE_WITH_PARENT": "1"}


def _wait_for(predicate: Callable[[], object], timeout: float, what: str, log: Path, stop: threading.Event):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if stop.wait(0.2):
            raise IslesError("the demo was interrupted; its processes were stopped", hint=f"logs are in {log.parent}")
    raise IslesError(f"demo: timed out after {timeout:.0f}s waiting for {what}", hint=f"see {log}")


def run_demo(config: DemoConfig, log: Callable[[str], None], stop: threading.Event | None = None) -> dict:
    """Run the demo; returns the aggregator's summary plus run id, folders and wall time. `stop` (set on Ctrl-C or
    SIGTERM) ends it early. Children are always stopped, even on failure."""
    stop = stop or threading.Event()
    r = config.recipe
    work = config.work_dir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    echo = log if config.echo else None
    started = time.monotonic()
    deadline = started + r.timeout
    children: list[Child] = []
    try:
        log(f"demo: partitioning {r.source} into {config.experts} shards (work folder {work})")
        # 1. Shards and the run manifest, published to a local store in the work folder.
        from isles.router.partition import PartitionConfig, partition

        partition(
            PartitionConfig(
                identity=work / "identities" / "aggregator",  # the run owner: signs the manifest, aggregates
                source=r.source,
                resolution=r.resolution,
                frames=r.frames,
                conditioning=r.conditioning,
                text_encoder=r.text_encoder,
                text_max_length=r.text_max_length,
                experts=config.experts,
                out=work / "run",
                store=str(store),
                name="video-demo" if r.frames else "text-demo" if r.conditioning == "text" else "digits-demo",
                seed=config.seed,
                preset=r.preset,
                steps=r.expert_steps,
                global_batch=r.global_batch,
                lr=r.lr,
                warmup_steps=r.warmup_steps,
                ema_decay=r.ema_decay,
                router_preset=r.router_preset,
                router_steps=r.router_steps,
                router_batch=r.global_batch,
            )
        )
        manifest_path = work / "run" / "manifest.json"
        run_id = json.loads(manifest_path.read_text())["run_id"]
        # 2. The bootstrap node keeps the manifest alive; its join line tells us its address.
        boot = Child(
            "bootstrap",
            [
                "bootstrap",
                "--manifest",
                str(manifest_path),
                "--host-maddrs",
                "/ip4/127.0.0.1/tcp/0",
                "--identity",
                str(work / "identities" / "bootstrap"),
            ],
            logs,
            echo,
            _child_env(),
        )
        children.append(boot)

        def join_line():
            if boot.proc.poll() is not None:
                raise IslesError("the demo's bootstrap node exited", hint=f"see {boot.log_path}")
            match = JOIN_LINE.search(boot.output())
            return match.group(1) if match else None

        peer = _wait_for(join_line, 60, "the bootstrap node", boot.log_path, stop)
        # Every peer of the demo listens on loopback only (the default binds every interface).
        volunteer_args = [
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--lease-ttl",
            str(r.lease_ttl),
            "--heartbeat-period",
            str(r.heartbeat_period),
            "--settle-period",
            str(r.settle_period),
        ]
        # 3. Volunteers and the aggregator, each its own process and identity.
        for i in range(config.volunteers):
            name = f"volunteer-{i}"
            children.append(
                Child(
                    name,
                    [
                        "join",
                        "--peers",
                        peer,
                        "--run",
                        run_id,
                        "--store",
                        str(store),
                        "--work-dir",
                        str(work / name),
                        "--identity",
                        str(work / "identities" / name),
                        "--checkpoint-period",
                        str(r.checkpoint_period),
                        "--device",
                        "cpu",
                        "--name",
                        name,
                        *volunteer_args,
                    ],
                    logs,
                    echo,
                    _child_env(),
                )
            )
        summary_path = work / "aggregate-summary.json"
        agg = Child(
            "aggregator",
            [
                "aggregate",
                "--peers",
                peer,
                "--run",
                run_id,
                "--store",
                str(store),
                "--to",
                f"demo-{run_id}-ensemble",
                "--work-dir",
                str(work / "aggregator"),
                "--identity",
                str(work / "identities" / "aggregator"),
                "--until-complete",
                "--summary",
                str(summary_path),
                "--sample-steps",
                str(r.sample_steps),
                "--poll-period",
                "1",
                "--host-maddrs",
                "/ip4/127.0.0.1/tcp/0",
            ],
            logs,
            echo,
            _child_env(),
        )
        children.append(agg)

        volunteers = [c for c in children if c.name.startswith("volunteer")]
        reported: set[str] = set()

        def finished():
            if agg.proc.poll() is not None:
                return True
            failed = [c for c in volunteers if c.proc.poll() not in (None, 0)]
            for c in failed:
                if c.name not in reported:
                    reported.add(c.name)
                    log(f"demo: {c.name} exited with {c.proc.returncode}; the others carry on")
            if len(failed) == len(volunteers):  # nobody is left to train: waiting for the timeout helps no one
                raise IslesError("every volunteer of the demo failed", hint=f"see {failed[0].log_path}")
            return False

        _wait_for(finished, max(10.0, deadline - time.monotonic()), "the ensemble to be complete", agg.log_path, stop)
        agg.wait_output(10)
        if agg.proc.returncode != 0 or not summary_path.exists():
            raise IslesError(f"the demo's aggregator failed (exit {agg.proc.returncode})", hint=f"see {agg.log_path}")
        # Volunteers leave by themselves once every unit is released; give them a moment to say goodbye.
        for c in children:
            if c.name.startswith("volunteer"):
                try:
                    c.proc.wait(20)
                except subprocess.TimeoutExpired:
                    c.stop()
        summary = json.loads(summary_path.read_text())
        if summary.get("samples"):
            shutil.copyfile(summary["samples"], work / "samples.png")
            summary["samples"] = str(work / "samples.png")
        if r.frames:
            summary.update(video_clips(summary["ensemble"], work / "prompts.gif", r))
            summary["prompts"] = video_prompts()
        elif r.conditioning == "text":
            summary["prompt_grid"] = str(prompt_grid(summary["ensemble"], work / "prompts.png", r))
            summary["prompts"] = demo_prompts()
        summary["run_id"] = run_id
        summary["work_dir"] = str(work)
        summary["logs"] = str(logs)
        summary["wall_s"] = round(time.monotonic() - started, 1)
        return summary
    finally:
        for c in reversed(children):
            c.stop()


# One row each in the text demo's grid: every family, and each attribute a caption names (colour, size, position).
# Procedural attribute rows (class, colour, position, size; -1 where it does not apply), captioned by the data set's
# own grammar so the prompts are sentences the experts were trained on.
DEMO_ATTRIBUTES = [
    [3, 0, 4, 1],  # a large red 3 in the center
    [7, 5, 0, 0],  # a small blue 7 at the top left
    [10, 3, 4, 1],  # a large green circle in the center
    [11, 2, 8, 0],  # a small yellow square at the bottom right
    [13, 6, 2, 1],  # a large purple ring at the top right
    [14, 1, -1, -1],  # orange stripes
    [15, 4, -1, -1],  # a cyan checkerboard
    [17, 7, 1, -1],  # a pink radial gradient at the top
]


def demo_prompts() -> list[str]:
    from isles.experts.procedural import caption

    return [caption(row) for row in DEMO_ATTRIBUTES]


# Video prompts: (class, colour, motion) rows, every motion once, digits and shapes.
VIDEO_ATTRIBUTES = [[3, 0, 0], [7, 5, 1], [10, 3, 2], [11, 2, 3], [5, 6, 4], [13, 4, 5], [12, 1, 6], [8, 7, 7]]


def video_prompts() -> list[str]:
    from isles.experts.procedural_video import caption

    return [caption(row) for row in VIDEO_ATTRIBUTES]


def video_clips(ensemble: str, path: Path, recipe: DemoRecipe, per_prompt: int = 2) -> dict:
    """Sample the published video ensemble for video_prompts(): a GIF (a row of clips per 2 prompts), an MP4 and a
    frame sheet with one labelled row per clip; returns their paths."""
    from isles.experts.video_files import save_clip_grid_gif, save_clip_grid_mp4, save_frame_sheet
    from isles.router.ensemble import EnsemblePipeline

    pipe = EnsemblePipeline.from_pretrained(ensemble, device="cpu")
    prompts = [p for p in video_prompts() for _ in range(per_prompt)]
    clips = pipe(prompt=prompts, routing="top1", steps=recipe.sample_steps, seed=0, guidance_scale=recipe.guidance)
    scale = max(1, 64 // clips.images.shape[-1])
    sheet, mp4 = path.with_name(path.stem + "-frames.png"), path.with_suffix(".mp4")
    save_clip_grid_gif(clips.images, path, nrow=2 * per_prompt, scale=scale)
    save_clip_grid_mp4(clips.images, mp4, nrow=2 * per_prompt, scale=scale)
    save_frame_sheet(clips.images, sheet, scale=max(1, scale // 2), labels=prompts, max_clips=len(prompts))
    return {"clips_gif": str(path), "clips_mp4": str(mp4), "clips_frames": str(sheet)}


def prompt_grid(ensemble: str, path: Path, recipe: DemoRecipe, per_prompt: int = 8) -> Path:
    """Sample the published text ensemble: one labelled row per prompt of demo_prompts(); returns the PNG's path."""
    from isles.router.ensemble import EnsemblePipeline

    from .cli.sample import save_prompt_grid

    pipe = EnsemblePipeline.from_pretrained(ensemble, device="cpu")
    rows = demo_prompts()
    prompts = [p for p in rows for _ in range(per_prompt)]
    images = pipe(prompt=prompts, routing="top1", steps=recipe.sample_steps, seed=0, guidance_scale=recipe.guidance)
    save_prompt_grid(images.images, rows, per_prompt, path, scale=max(1, 48 // images.images.shape[-1]))
    return path
