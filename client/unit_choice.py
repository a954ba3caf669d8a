"""Which units a volunteer takes: the largest it can finish first, and none that this machine would take longer than
`--max-unit-hours` to train, judged by a measured training step of the unit's own recipe (not by guessing).
"""

from __future__ import annotations

from collections.abc import Iterable

MEASURE_BATCH = 16  # items in the measured step (fewer when the recipe's batch is smaller); time scales per item


def unit_hours(steps: int, global_batch: int, seconds_per_item: float) -> float:
    """Hours to train `steps` steps of `global_batch` items at a measured `seconds_per_item`."""
    return steps * global_batch * seconds_per_item / 3600.0


def units_too_slow(
    experts: list, units: list[str], device: str, max_hours: float, labels: list[str]
) -> dict[str, str]:
    """unit -> why this machine does not take it: one measured step of each distinct recipe (`labels[i]` names
    expert i's model and shape), scaled to the recipe's steps and batch, is over `max_hours`."""
    from .doctor import measure_step

    per_item: dict[str, float] = {}
    refused = {}
    for recipe, unit, label in zip(experts, units, labels, strict=True):
        if label not in per_item:
            shape = {
                "channels": recipe.channels,
                "resolution": recipe.resolution,
                "num_classes": recipe.num_classes,
                "text_width": recipe.text_width,
                "text_length": recipe.text_length,
                "frames": recipe.frames,
            }
            batch = min(recipe.global_batch, MEASURE_BATCH)
            measured = measure_step(recipe.preset, device, batch, shape)
            per_item[label] = measured["seconds"] / batch if measured["micro_batch"] else float("inf")
        hours = unit_hours(recipe.steps, recipe.global_batch, per_item[label])
        if hours > max_hours:
            rate = 1.0 / per_item[label] if per_item[label] > 0 else float("inf")
            refused[unit] = (
                f"{label}: ~{hours:.1f} h on this machine ({rate:.1f} samples/s measured), "
                f"over --max-unit-hours {max_hours:g}"
            )
    return refused


def largest_first(units: Iterable[str], sizes: dict[str, int]) -> list[list[str]]:
    """The units in groups of equal training cost (parameters x steps), largest group first: a machine that can finish
    the big units takes them and leaves the small ones to smaller machines. Within a group the lease manager's own
    order (each peer's rendezvous order, which spreads volunteers over units) decides; unknown costs count as 0."""
    groups: dict[int, list[str]] = {}
    for unit in units:
        groups.setdefault(sizes.get(unit, 0), []).append(unit)
    return [groups[size] for size in sorted(groups, reverse=True)]
