"""What the aggregator checks of a release before it loads anything: its size against the recipe's model, its config
against the recipe's model's (every key, exactly), its weights for NaN and inf, and its checkpoint chain (the training
it came from: every verified checkpoint of its holder on it, ending at the recipe's last step in a checkpoint whose EMA
weights are the exported ones). The recipe's model is built on the meta device, so a check never allocates what a
hostile config asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

# Config keys diffusers writes for its own bookkeeping: not constructor arguments, free to differ.
CONFIG_BOOKKEEPING = ("_diffusers_version", "_name_or_path", "_use_default_values")


def unit_index(unit: str) -> int:
    return int(unit.rsplit("-", 1)[1])


class RecipeChecks:
    """The recipe's models of a run's units (cached) and the checks of a release against them."""

    def __init__(self, manifest):
        self.manifest = manifest
        self._models: dict[str, tuple] = {}

    def recipe_model(self, unit: str):
        """The recipe's model for `unit`, built on the meta device (nothing allocated), and its full saved config:
        every constructor argument, defaults included, as `save_pretrained` writes it into config.json."""
        if unit not in self._models:
            self._models[unit] = self._build(unit)
        return self._models[unit]

    def _build(self, unit: str):
        import torch

        m = self.manifest
        if unit == "router":
            from isles.router.model import RouterModel, router_config

            r, e = m.router, m.experts[0]
            num_classes = e.num_classes if r.class_conditional else None
            text_dim = e.text_width if r.text_aware else None
            config = router_config(r.preset, len(m.shards), e.channels, e.resolution, num_classes, e.frames, text_dim)
            with torch.device("meta"):
                return RouterModel(config), config.saved()
        from isles.experts.presets import _instantiate, model_config

        r = m.experts[unit_index(unit)]
        config = model_config(r.preset, r.channels, r.resolution, r.num_classes, r.text_width, r.frames)
        with torch.device("meta"):
            model = _instantiate(config)
        return model, {**dict(model.config), "_class_name": config["_class_name"]}

    def expected_config(self, unit: str) -> dict:
        """What a release's config.json must be, key for key."""
        return self.recipe_model(unit)[1]

    def max_bytes(self, unit: str) -> int:
        """The most bytes a release of `unit` may take: the recipe's model in fp32, twice, plus 1 MiB for its JSON
        files, plus its final checkpoint and chain file at their bounds. Larger releases are refused unread."""
        from isles.experts.checkpoints import size_bound
        from isles.protocol.chain import MAX_CHAIN_BYTES

        model = self.recipe_model(unit)[0]
        weights = 2 * sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()]) + (1 << 20)
        return weights + size_bound(model) + MAX_CHAIN_BYTES

    def check_config(self, unit: str, folder: Path) -> str | None:
        m = self.manifest
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            return f"config.json is unreadable: {exc}"
        expected = self.expected_config(unit)
        if unit != "router":
            r = m.experts[unit_index(unit)]
            info_path = folder / "expert.json"
            objective = json.loads(info_path.read_text()).get("objective") if info_path.is_file() else r.objective
            if objective != r.objective:
                return f"trained with objective {objective!r}, the manifest's recipe says {r.objective!r}"
        if not isinstance(config, dict):
            return "config.json is not a JSON object"
        # Every key, exactly: a key the recipe does not set (say `time_embedding_dim`) is a constructor argument too,
        # and could allocate huge layers before any weight is read. The class counts: another class loads the same
        # keys and fills the rest with its own defaults.
        want = {k: v for k, v in json.loads(json.dumps(expected)).items() if k not in CONFIG_BOOKKEEPING}
        have = {k: v for k, v in config.items() if k not in CONFIG_BOOKKEEPING}
        for key in sorted(want.keys() | have.keys()):
            if key not in have:  # a missing key would load as the library's default, not the recipe's value
                return f"config differs from the manifest's recipe: {key} is missing"
            if key not in want:
                return f"config differs from the manifest's recipe: {key} is not part of the recipe"
            if have[key] != want[key]:
                return f"config differs from the manifest's recipe: {key} is {have[key]!r}, expected {want[key]!r}"
        return None


def non_finite(folder: Path, weights: str) -> str | None:
    import torch
    from safetensors.torch import load_file

    for name, tensor in load_file(str(folder / weights)).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"non-finite weights (NaN or inf) in {name}"
    return None


def check_chain(
    manifest, release, folder: Path, weights: str, verified: list[tuple[int, str, str]], resume_points: set | None
) -> str | None:
    """Why a release's checkpoint chain (protocol/chain.py) does not hold, or None.

    verified: (step, sha256, chain link) of every checkpoint of the releaser's attempt the run's aggregators verified;
    each must be on the chain, unaltered. resume_points: (step, sha256) of the unit's verified checkpoints, where a
    resumed release must start, and which no other chain may claim as its own training (None: nothing of the unit
    verified, so nothing to hold it to)."""
    from isles.protocol.chain import CHAIN_FILE, FINAL_CHECKPOINT, Chain
    from isles.protocol.errors import IslesError
    from isles.protocol.swarm import recipe_steps

    if CHAIN_FILE not in release.files or FINAL_CHECKPOINT not in release.files:
        return f"release carries no checkpoint chain ({CHAIN_FILE} and {FINAL_CHECKPOINT}): its training is unchecked"
    try:
        chain = Chain.read(folder / CHAIN_FILE, manifest.run_id, release.unit)
    except IslesError as exc:
        return f"checkpoint chain: {exc.message}"
    if chain.head != release.chain_head:
        return "checkpoint chain: its head is not the one in the release record its releaser signed"
    steps, first, last = recipe_steps(manifest, release.unit), chain.links[0], chain.links[-1]
    if last.step != steps:
        return f"checkpoint chain ends at step {last.step}, not at the recipe's last step {steps}"
    if last.sha256 != release.files[FINAL_CHECKPOINT]:
        return f"checkpoint chain: its last link is not the release's {FINAL_CHECKPOINT}"
    if release.resumed_from_step:
        if first.step != release.resumed_from_step:
            return f"checkpoint chain starts at step {first.step}, not at step {release.resumed_from_step} it resumed"
        if resume_points is not None and (first.step, first.sha256) not in resume_points:
            return f"resumed from a checkpoint at step {first.step} that no aggregator verified"
    own = {(step, sha256) for step, sha256, _ in verified}
    for link in chain.links[1 if release.resumed_from_step else 0 :]:  # its own training, past where it resumed
        if resume_points is not None and (link.step, link.sha256) in resume_points - own:
            return f"checkpoint chain claims the checkpoint verified at step {link.step} as another peer's as its own"
    for step, sha256, link in verified:
        found = chain.find(step)
        if found is None:
            return f"checkpoint chain omits the checkpoint verified at step {step}"
        if found.sha256 != sha256 or (link and found.link != link):
            return f"checkpoint chain alters the checkpoint verified at step {step}"
    return final_weights(folder, weights, steps)


def final_weights(folder: Path, weights: str, steps: int) -> str | None:
    """Why the exported weights are not the final checkpoint's EMA weights (what the trainer exports), or None."""
    import torch
    from safetensors.torch import load_file

    from isles.experts.checkpoints import read_checkpoint
    from isles.protocol.chain import FINAL_CHECKPOINT
    from isles.protocol.errors import IslesError

    try:
        state = read_checkpoint(folder / FINAL_CHECKPOINT)
    except IslesError as exc:
        return f"final checkpoint: {exc.message}"
    if state.get("step") != steps:
        return f"final checkpoint is at step {state.get('step')!r}, not at the recipe's last step {steps}"
    ema, exported = state.get("ema"), load_file(str(folder / weights))
    if not isinstance(ema, dict) or set(ema) != set(exported):
        return "exported weights are not the final checkpoint's EMA weights (other tensors)"
    for name, tensor in exported.items():
        theirs = ema[name]
        if not isinstance(theirs, torch.Tensor) or theirs.dtype != tensor.dtype or not torch.equal(theirs, tensor):
            return f"exported weights differ from the final checkpoint's EMA weights ({name})"
    return None
