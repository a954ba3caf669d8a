"""The model card (README.md) of a published ensemble: Hub metadata, what the ensemble is, who trained which unit (the
volunteer's name beside the peer id its release was signed by), and how to sample it.
"""

from __future__ import annotations

from isles.protocol.installation import isles_version

SAMPLES_FILE = "samples.png"


def model_card(manifest, provenance: dict, repo: str, has_samples: bool) -> str:
    """README.md of the ensemble: Hub metadata, what it is, who trained which unit, how to sample it."""
    lines = [
        "---",
        "library_name: isles",
        "tags: [diffusion, decentralized-diffusion, ensemble, isles]",
        "---",
        f"# {manifest.name}: an isles ensemble (run {manifest.run_id})",
        "",
        f"{manifest.description or manifest.dataset}. {len(manifest.shards)} experts, each trained in isolation "
        "on one data cluster by a volunteer, plus a router that picks experts at every denoising step.",
        "",
        f"Every unit was verified and the ensemble assembled by isles {isles_version()}.",
        "",
        "| unit | trained by | steps | resumed from | wall s | val loss (limit) | revision |",
        "|---|---|---|---|---|---|---|",
    ]
    for unit in manifest.units:
        p = provenance.get(unit)
        if p is None:
            lines.append(f"| {unit} | (not yet) | | | | | |")
            continue
        lines.append(
            f"| {unit} | {_attribution(p)} | {p['steps']} | {p['resumed_from_step'] or '-'} | {p['wall_s']:.0f} | "
            f"{p['val_loss']:.4f} ({p['threshold']:.4f}) | {p['revision'][:12]} |"
        )
    lines += ["", "Sample it:", "", "```", f"isles sample {repo} --store <store> --out grid.png --routing top1", "```"]
    if has_samples:
        lines += ["", f"![samples]({SAMPLES_FILE})"]
    return "\n".join(lines) + "\n"


def _attribution(provenance: dict) -> str:
    name, peer_id = provenance["trained_by"], provenance["peer_id"]
    return peer_id if name == peer_id else f"{name} ({peer_id})"
