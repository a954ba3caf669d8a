"""Before a volunteer claims anything: can it publish what it trains? The store reachable and writable (a Hub token
allowed to create repos in the namespace, a folder it can write), and disk for one unit. Each failure is one
`IslesError` with the exact fix; `isles join` and `isles doctor` both ask here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from isles.protocol.errors import IslesError

from .machine import DISK_PARAMS_FACTOR

LOGIN = "hf auth login"  # the huggingface_hub CLI; HF_TOKEN=hf_... works too
WRITE_ROLES = {"admin", "write", "contributor"}  # an organization role that may create repos


def check_store(store) -> str:
    """Raise unless `publish` to `store` can succeed; returns one line saying what was checked."""
    store.check_writable()  # no token at all, or a folder this user cannot write
    namespace = getattr(store, "namespace", None)
    if namespace is None:
        return f"store {store.uri}: writable"
    if not namespace:  # repos are named namespace/name in full: each publish is checked by the Hub itself
        return f"store {store.uri}: token present"
    info = _whoami(store)
    problem = hub_write_problem(info, namespace)
    if problem:
        user = info.get("name", "?")
        raise IslesError(
            f"the Hub token of {user} cannot create repos in {namespace}: {problem}",
            hint=f"1. create a token with write access at https://huggingface.co/settings/tokens; "
            f"2. run `{LOGIN}` (or set HF_TOKEN) with it; "
            f"3. or publish under your own account: --store hf://{user}",
        )
    return f"store {store.uri}: token of {info.get('name', '?')} may create repos in {namespace}"


def _whoami(store) -> dict:
    api = store._api  # HubStore's client: same endpoint and token as its uploads
    try:
        return api.whoami()
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise IslesError(
                f"the Hub at {store.endpoint} does not accept this token (401)",
                hint=f"run `{LOGIN}` again (or set HF_TOKEN) with a valid token that has write access",
            ) from None
        if status is not None:
            raise IslesError(
                f"the Hub at {store.endpoint} answered {status} when asked who this token belongs to",
                hint="retry in a minute; https://status.huggingface.co shows Hub incidents",
            ) from None
        raise IslesError(
            f"cannot reach the Hub at {store.endpoint} ({type(exc).__name__})",
            hint="check the network (and HF_ENDPOINT if set), https://status.huggingface.co, then run again; "
            "or publish to a folder: --store DIR",
        ) from None


def hub_write_problem(info: dict, namespace: str) -> str | None:
    """Why the token `info` (what the Hub's whoami answers) may not create repos under `namespace`; None if it may.

    Classic tokens have the role "read" or "write"; fine-grained ones list permissions per user or organization."""
    token = (info.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    user = info.get("name")
    orgs = {o.get("name"): o for o in info.get("orgs") or [] if isinstance(o, dict)}
    if namespace != user and namespace not in orgs:
        return f"{namespace} is neither the token's user ({user}) nor one of its organizations"
    if namespace in orgs and orgs[namespace].get("roleInOrg", "write") not in WRITE_ROLES:
        return f"your role in {namespace} is {orgs[namespace].get('roleInOrg')!r}"
    if role == "read":
        return "it is a read-only token"
    if role == "fineGrained":
        fine = token.get("fineGrained") or {}
        for scope in fine.get("scoped") or []:
            if (scope.get("entity") or {}).get("name") == namespace and "repo.write" in scope.get("permissions", []):
                return None
        return f"the fine-grained token lacks 'repo.write' on {namespace}"
    return None


def unit_disk_bytes(manifest) -> int:
    """Disk for the largest unit of a run: its shard (float32 items, caption embeddings) plus two checkpoints and the
    export (machine.DISK_PARAMS_FACTOR per parameter)."""
    from .machine import param_count

    need = 0
    for recipe, ref in zip(manifest.experts, manifest.shards, strict=True):
        frames = getattr(recipe, "frames", None) or 1  # clips: [C, F, H, W]
        item = (
            recipe.channels * frames * recipe.resolution**2 * 4
            + (recipe.text_width or 0) * (recipe.text_length or 0) * 4
        )
        params = param_count(
            recipe.preset, recipe.channels, recipe.resolution, recipe.num_classes, recipe.text_width, recipe.frames
        )
        need = max(need, (ref.items + ref.val_items) * item + params * DISK_PARAMS_FACTOR)
    return need


def check_disk(work_dir: Path, need_bytes: int) -> str:
    probe = Path(work_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise IslesError(
            f"{need_bytes / 2**30:.2f} GB of disk needed for one unit, {free / 2**30:.2f} GB free in {probe}",
            hint="free disk space there, or put the work folder on a larger disk: --work-dir DIR",
        )
    return f"disk: {free / 2**30:.1f} GB free in {probe}, {need_bytes / 2**30:.2f} GB needed per unit"


def preflight(store, work_dir: Path, manifest) -> list[str]:
    """Everything `isles join` checks before it claims a unit; raises the first failure, returns what it checked."""
    return [check_store(store), check_disk(work_dir, unit_disk_bytes(manifest))]
