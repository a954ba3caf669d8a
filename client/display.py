"""What a volunteer sees while training: a live rich panel on a terminal, plain log lines every few seconds otherwise.

`TrainingDisplay(console, plain=None)` is a context manager; call `update(...)` as often as you like (it throttles)
and `event(text)` for one-off lines (claimed a unit, pushed a checkpoint, released).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text


@dataclass
class Progress:
    unit: str = "-"
    step: int = 0
    steps: int = 0
    loss: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    peers: int | None = None
    resumed_from: int | None = None
    state: str = "starting"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plain_line(p: Progress) -> str:
    """`expert-1 step 120/500 loss 0.142 35.2 samples/s eta 0:11 peers 3`: one greppable line."""
    parts = [p.unit, f"step {p.step}/{p.steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.samples_per_s is not None:
        parts.append(f"{p.samples_per_s:.1f} samples/s")
    parts.append(f"eta {format_duration(p.eta_s)}")
    if p.peers is not None:
        parts.append(f"peers {p.peers}")
    return " ".join(parts)


def _table(p: Progress, events: list[str]) -> Table:
    table = Table(title="isles volunteer", show_header=False, expand=False)
    table.add_column(style="bold")
    table.add_column()
    done = p.step / p.steps if p.steps else 0.0
    bar_width = 30
    bar = "\u2588" * int(done * bar_width) + "\u2591" * (bar_width - int(done * bar_width))
    table.add_row("unit", f"{p.unit} ({p.state})")
    resumed = f"  (resumed from {p.resumed_from})" if p.resumed_from else ""
    table.add_row("step", f"{p.step} / {p.steps}  {bar} {done:5.1%}{resumed}")
    table.add_row("loss", "-" if p.loss is None else f"{p.loss:.4f}")
    table.add_row("samples/s", "-" if p.samples_per_s is None else f"{p.samples_per_s:.1f}")
    table.add_row("ETA", format_duration(p.eta_s))
    table.add_row("peers online", "-" if p.peers is None else str(p.peers))
    for line in events[-4:]:  # events quote other peers' records: never parse them as markup
        table.add_row("", Text(line, style="dim"))
    return table


class TrainingDisplay:
    """Live panel when `console` is a terminal (or plain=False), else a plain line every `log_period` seconds."""

    def __init__(self, console: Console, plain: bool | None = None, log_period: float = 5.0):
        self.console = console
        self.plain = (not console.is_terminal) if plain is None else plain
        self.log_period = log_period
        self.progress = Progress()
        self._events: list[str] = []
        self._live: Live | None = None
        self._last_line = 0.0

    def __enter__(self) -> TrainingDisplay:
        if not self.plain:
            self._live = Live(_table(self.progress, self._events), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(_table(self.progress, self._events))
            self._live.__exit__(*exc)
            self._live = None

    def update(self, force: bool = False, **fields) -> None:
        for name, value in fields.items():
            setattr(self.progress, name, value)
        if self._live is not None:
            self._live.update(_table(self.progress, self._events))
            return
        now = time.monotonic()
        if force or now - self._last_line >= self.log_period:
            self._last_line = now
            self._print(plain_line(self.progress))

    def event(self, text: str) -> None:
        """A one-off line (claimed, resumed, pushed, released); always printed, also kept in the live panel."""
        self._events.append(text)
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
            self._live.update(_table(self.progress, self._events))
        else:
            self._print(text)

    def _print(self, text: str) -> None:
        # Plain mode: no markup, no wrapping, so scripts and tests can grep the lines.
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        if hasattr(self.console.file, "flush"):
            self.console.file.flush()
