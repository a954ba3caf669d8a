"""`isles doctor`: what this machine can do for a run and what to fix. Device and memory, a measured training step per
preset, free disk, the p2p daemon, the peers (latency, clock skew), this peer's reachability, the store and its auth.
`run_doctor(DoctorConfig(...))` returns `Check`s; each failure carries numbered steps with the exact command.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from isles.protocol.errors import IslesError

MEASURED = ("unet-tiny", "unet-small", "unet-base", "dit-s-2", "dit-b-2", "dit-xl-2")  # smallest first
MIN_DISK_GB = 2.0
MAX_SKEW_S = 3.0  # hivemind assumes clocks within 3 s (MAX_DHT_TIME_DISCREPANCY_SECONDS)


@dataclass(frozen=True)
class DoctorConfig:
    peers: tuple[str, ...] = ()
    store: str | None = None
    device: str = "auto"
    work_dir: Path = Path(".")
    presets: tuple[str, ...] = ()  # () = MEASURED, smallest first, until one does not fit or is too slow
    batch: int = 8
    measure: bool = True  # measure training steps (False: a quick check, e.g. a container healthcheck)
    step_budget: float = 10.0  # stop measuring larger presets once a step takes longer than this (seconds)
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    startup_timeout: float = 30.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def run_doctor(config: DoctorConfig) -> list[Check]:
    checks = [_device(config)]
    if checks[0].ok and config.measure:
        checks += _training_steps(config, checks[0].data["device"])
    checks.append(_disk(config.work_dir))
    checks.append(_daemon(config))
    if config.peers and checks[-1].ok:
        peer_checks, manifests = _peers(config)
        checks += peer_checks
        if checks[0].ok and config.measure:
            checks += _run_units(config, manifests, checks[0].data["device"])
    if config.store:
        checks.append(_store(config.store))
    return checks


def to_json(checks: list[Check]) -> dict:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}


# --- the machine ----------------------------------------------------------------------------------------------------


def _device(config: DoctorConfig) -> Check:
    from isles.experts.device import autocast_dtype

    from .machine import check_machine

    try:
        m = check_machine(config.device, config.work_dir)
    except IslesError as exc:
        return Check("device", False, exc.message, [exc.hint or "isles doctor --device auto"])
    import torch

    dtype = autocast_dtype(torch.device(m.device))
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}[dtype]
    detail = f"{m.device} ({m.device_name}), {m.memory_gb:.1f} GB free for training, {precision}"
    return Check("device", True, detail, data={"device": m.device, "memory_gb": round(m.memory_gb, 2),
                                                "precision": precision, "cpus": m.cpu_count})  # fmt: skip


def preset_shape(preset: str) -> dict:
    """The data shape a preset is measured at when no run says otherwise: 32x32x4 latents with 10 classes; for text
    presets 77 caption tokens of width 768 instead of classes; for video presets the clips `isles presets` uses."""
    from isles.experts.presets import TEXT_FAMILIES, VIDEO_FAMILIES, clip_shape, get_preset

    p = get_preset(preset)
    if p.family in VIDEO_FAMILIES:
        channels, frames, side = clip_shape(preset)
        return {"channels": channels, "resolution": side, "num_classes": None, "text_width": 768,
                "text_length": 77, "frames": frames}  # fmt: skip
    if p.family in TEXT_FAMILIES:
        return {
            "channels": 4,
            "resolution": 32,
            "num_classes": None,
            "text_width": 768,
            "text_length": 77,
            "frames": None,
        }
    return {
        "channels": 4,
        "resolution": 32,
        "num_classes": 10,
        "text_width": None,
        "text_length": None,
        "frames": None,
    }


def measure_step(preset: str, device: str, batch: int, shape: dict | None = None) -> dict:
    """One warm training step of `preset` (forward, backward, AdamW) at `batch`, halving the micro-batch on
    out-of-memory as the trainer does. {"seconds", "micro_batch", "peak_gb"}; micro_batch 0 means nothing fits."""
    import torch

    from isles.experts.conditioning import TextCondition
    from isles.experts.device import autocast_dtype
    from isles.experts.presets import build_model, model_forward

    s = shape or preset_shape(preset)
    dev = torch.device(device)
    dtype = autocast_dtype(dev)
    model = build_model(preset, s["channels"], s["resolution"], s["num_classes"], s["text_width"], s["frames"]).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    item = (s["channels"], *((s["frames"],) if s["frames"] else ()), s["resolution"], s["resolution"])

    def condition(n: int):
        if s["num_classes"]:
            return torch.randint(0, s["num_classes"], (n,), device=dev)
        if s["text_width"]:
            tokens = s["text_length"] or 77
            return TextCondition(
                torch.randn(n, tokens, s["text_width"], device=dev), torch.ones(n, tokens, device=dev)
            )
        return None

    micro, seconds = batch, 0.0
    while micro >= 1:
        try:
            for _ in range(2):  # the first step allocates the optimizer state and warms the kernels up
                start = time.perf_counter()
                for _piece in range(0, batch, micro):
                    x = torch.randn(micro, *item, device=dev)
                    t = torch.rand(micro, device=dev) * 1000
                    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                        loss = (model_forward(model, x, t, condition(micro)).float() - x).pow(2).mean()
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - start
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            micro //= 2
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    del model, optimizer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    return {"seconds": round(seconds, 4), "micro_batch": micro, "peak_gb": None if peak is None else round(peak, 2)}


def _measure(label: str, preset: str, shape: dict, config: DoctorConfig, device: str, batch: int) -> Check:
    """One training-step check. Too large to try (estimated from the parameters) is information, not a failure:
    only a preset that runs out of memory even at micro-batch 1 is."""
    from .machine import check_machine, param_count, training_bytes

    params = param_count(
        preset, *(shape[k] for k in ("channels", "resolution", "num_classes", "text_width", "frames"))
    )
    memory = check_machine(device, config.work_dir).memory_gb * 2**30
    where = f"{shape['resolution']}x{shape['resolution']}x{shape['channels']}" + (
        f"x{shape['frames']}" if shape["frames"] else ""
    )
    if training_bytes(params) > memory:  # measuring it would only exhaust the machine
        detail = f"does not fit: ~{training_bytes(params) / 2**30:.1f} GB needed, {memory / 2**30:.1f} GB free"
        return Check(label, True, detail, data={"params": params, "measured": False, "fits": False})
    result = measure_step(preset, device, batch, shape)
    rate = batch / result["seconds"] if result["micro_batch"] else 0.0
    data = {"params": params, "measured": True, "fits": bool(result["micro_batch"]), "samples_per_s": round(rate, 2),
            **result}  # fmt: skip
    if not result["micro_batch"]:
        fix = ["train a smaller preset (see `isles presets`)", "free GPU memory: close other programs"]
        return Check(label, False, "out of memory even at micro-batch 1", fix, data)
    micro = "" if result["micro_batch"] == batch else f" in micro-batches of {result['micro_batch']}"
    peak = "" if result["peak_gb"] is None else f", peak {result['peak_gb']:.2f} GB"
    detail = (
        f"{params / 1e6:.1f}M params at {where}: {result['seconds']:.2f} s/step "
        f"at batch {batch}{micro} ({rate:.1f} samples/s{peak})"
    )
    return Check(label, True, detail, data=data)


def _training_steps(config: DoctorConfig, device: str) -> list[Check]:
    checks = []
    for preset in config.presets or MEASURED:
        check = _measure(f"train {preset}", preset, preset_shape(preset), config, device, config.batch)
        checks.append(check)
        if not config.presets and (not check.data.get("fits") or check.data["seconds"] > config.step_budget):
            break  # larger presets would not fit, or take too long to measure
    return checks


def _run_units(config: DoctorConfig, manifests: list, device: str) -> list[Check]:
    """Each distinct expert recipe of the runs the peers announce: a measured step and the time a unit would take."""
    checks = []
    for m in manifests:
        recipes: dict[tuple, list[str]] = {}
        for i, e in enumerate(m.experts):
            key = (e.preset, e.channels, e.resolution, e.num_classes, e.text_width, e.text_length, e.frames)
            recipes.setdefault(key, []).append(f"expert-{i}")
        for key, units in recipes.items():
            names = ("preset", "channels", "resolution", "num_classes", "text_width", "text_length", "frames")
            shape = dict(zip(names, key, strict=True))
            e = m.experts[int(units[0].rsplit("-", 1)[1])]
            batch = min(e.global_batch, config.batch)
            label = f"run {m.run_id[:8]} {units[0]}" + (f" (+{len(units) - 1})" if len(units) > 1 else "")
            check = _measure(label, e.preset, shape, config, device, batch)
            if check.data.get("measured") and check.data.get("fits"):
                hours = e.steps * e.global_batch / check.data["samples_per_s"] / 3600
                check.detail += f"; one unit ({e.steps} steps x {e.global_batch}) ~{hours:.1f} h here"
                check.data["unit_hours"] = round(hours, 2)
            checks.append(check)
    return checks


def _disk(work_dir: Path) -> Check:
    probe = Path(work_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    if free < MIN_DISK_GB:
        fix = [f"free space on the disk of {probe} (`du -sh {probe}/*` shows what is large)",
               "or put the work folder on another disk: isles join --work-dir DIR"]  # fmt: skip
        return Check("disk", False, f"{free:.1f} GB free in {probe}", fix, {"free_gb": round(free, 2)})
    return Check("disk", True, f"{free:.1f} GB free in {probe}", data={"free_gb": round(free, 2)})


# --- the network ----------------------------------------------------------------------------------------------------


def _dht_config(config: DoctorConfig, peers: tuple[str, ...]):
    from isles.protocol.dht import DHTConfig

    # Not client mode: peers must be able to call us back for the reachability check.
    return DHTConfig(
        initial_peers=peers,
        host_maddrs=config.host_maddrs,
        announce_maddrs=config.announce_maddrs,
        startup_timeout=config.startup_timeout,
    )


def _daemon(config: DoctorConfig) -> Check:
    from isles.protocol.dht import open_dht

    start = time.monotonic()
    try:
        with open_dht(_dht_config(config, ())) as node:
            maddrs = node.visible_maddrs()
    except IslesError as exc:
        return Check("p2p daemon", False, exc.message, _steps(exc.hint))
    took = time.monotonic() - start
    shown = (maddrs[0] + (f" (+{len(maddrs) - 1} more)" if len(maddrs) > 1 else "")) if maddrs else "-"
    return Check("p2p daemon", True, f"started in {took:.1f} s, listening on {shown}",
                 data={"start_s": round(took, 2), "maddrs": maddrs})  # fmt: skip


async def _ping(_dht, node, peer: str) -> dict | None:
    """One DHT ping from inside the DHT process: the round trip and the peer's clock."""
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2
    from hivemind.utils import get_dht_time

    protocol = node.protocol
    request = dht_pb2.PingRequest(peer=protocol.node_info, validate=False)
    sent, start = get_dht_time(), time.perf_counter()
    try:
        response = await protocol.get_stub(PeerID.from_base58(peer)).rpc_ping(request, timeout=protocol.wait_timeout)
    except Exception:
        return None
    rtt = time.perf_counter() - start
    return {"rtt_s": rtt, "skew_s": response.dht_time - (sent + rtt / 2)}


def _peers(config: DoctorConfig) -> tuple[list[Check], list]:
    """The peers' checks, and the manifests of the runs they announce."""
    from isles.protocol.dht import open_dht
    from isles.protocol.swarm import Swarm

    try:
        node = open_dht(_dht_config(config, config.peers))
    except IslesError as exc:
        return [Check("peers", False, exc.message, _steps(exc.hint))], []
    checks = []
    with node:
        for maddr in config.peers:
            peer = maddr.rsplit("/p2p/", 1)[1]
            node.run_coroutine(partial(_ping, peer=peer))  # the connection is set up: not timed
            pong = node.run_coroutine(partial(_ping, peer=peer))
            if pong is None:
                checks.append(Check(f"peer {peer[-8:]}", False, f"{maddr} did not answer a ping", _steps(None)))
                continue
            skew = pong["skew_s"]
            detail = f"answers in {pong['rtt_s'] * 1000:.0f} ms, clock {skew:+.2f} s from ours"
            data = {"maddr": maddr, "rtt_ms": round(pong["rtt_s"] * 1000, 1), "skew_s": round(skew, 3)}
            fix = [] if abs(skew) <= MAX_SKEW_S else [
                "synchronise this machine's clock: sudo timedatectl set-ntp true (or install chrony / ntpd)",
                "check it: timedatectl status shows 'System clock synchronized: yes'",
            ]  # fmt: skip
            checks.append(Check(f"peer {peer[-8:]}", not fix, detail, fix, data))
        maddrs = node.visible_maddrs()
        swarm = Swarm(node)
        manifests = [m for e in swarm.list_runs() if (m := swarm.get_manifest(e.run_id)) is not None]
    checks.append(reachability(maddrs, config.announce_maddrs))
    return checks, manifests


def reachability(maddrs: list[str], announced: tuple[str, ...] = ()) -> Check:
    """Whether peers elsewhere could dial this peer, from the addresses it has: a global IP (or one announced on
    purpose), or only private ones (behind NAT). A peer's dial-back cannot decide it: it answers over the connection we
    opened."""
    import ipaddress

    def is_global(maddr: str) -> bool:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] in ("dns", "dns4", "dns6"):
            return True
        try:
            return len(parts) > 2 and ipaddress.ip_address(parts[2]).is_global
        except ValueError:
            return False

    public = [m for m in (*announced, *maddrs) if is_global(m)]
    if public:
        detail = f"public address {public[0]}: reachable unless a firewall blocks its port"
        return Check("reachability", True, detail, data={"reachable": True, "public": public})
    detail = "outbound-only: private addresses only (NAT); fine for `isles join`, which never needs to be dialled"
    fix = [
        "nothing to do for a volunteer;",
        "for a node others must reach (isles bootstrap), forward a TCP port to this machine and announce it: "
        "isles bootstrap --port 31337 --announce-maddrs /ip4/<public ip>/tcp/31337",
        "in Docker: publish the port (-p 31337:31337) and announce the host's address, or use --network host",
    ]
    return Check("reachability", True, detail, fix, {"reachable": False, "public": []})


def _store(uri: str) -> Check:
    from isles.protocol.artifacts import open_store

    from .preflight import check_store

    try:
        detail = check_store(open_store(uri))
    except IslesError as exc:
        return Check("store", False, exc.message, _steps(exc.hint))
    return Check("store", True, detail)


def _steps(hint: str | None) -> list[str]:
    """The numbered steps of an error's hint, one per item (hints list them as '1. ...;' or on lines of their own)."""
    if not hint:
        return ["check the address: copy it whole from the line `isles bootstrap` prints"]
    import re

    parts = [p.strip(" ;\n") for p in re.split(r"(?:^|\s)\d\.\s", hint)]
    steps = [p for p in parts[1:] if p] if len(parts) > 1 else [hint.strip()]
    return steps
