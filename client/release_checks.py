"""What the aggregator checks of a release before it loads anything: its size against the recipe's model, its config
against the recipe's model's (every key, exactly), its weights for NaN and inf. The recipe's model is built on the
meta device, so a check never allocates what a hostile config asks for.
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
            from dataclasses import asdict

            from isles.router.model import RouterModel, router_config

            r = m.router
            c, res = m.experts[0].channels, m.experts[0].resolution
            num_classes = m.experts[0].num_classes if r.class_conditional else None
            config = router_config(r.preset, len(m.shards), c, res, num_classes, m.experts[0].frames)
            with torch.device("meta"):
                return RouterModel(config), {"_class_name": "IslesRouter", **asdict(config)}
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
        files. Larger releases are refused unread."""
        model = self.recipe_model(unit)[0]
        return 2 * sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()]) + (1 << 20)

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
