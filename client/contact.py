"""First contact with the swarm, retried: a volunteer whose bootstrap node is not up yet, or whose network comes up
late (a laptop waking, a NAT gateway rebooting), tries again with backoff instead of giving up on its first attempt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from isles.protocol.dht import DHTConfig
from isles.protocol.errors import IslesError

FIRST_WAIT = 2.0  # seconds before the second attempt; doubled each time, at most MAX_WAIT
MAX_WAIT = 30.0


def unreachable(exc: IslesError) -> bool:
    """Whether `open_dht` failed because no initial peer answered (worth retrying), not for a reason of ours."""
    return exc.message.startswith("could not reach any of the peers")


def open_swarm_retrying(
    config: DHTConfig,
    contact_timeout: float,
    stop: threading.Event,
    say: Callable[[str], None],
    open_swarm: Callable | None = None,
):
    """`run_access.open_swarm(config)`, tried again while no initial peer answers, until `contact_timeout` seconds
    have passed (0: one attempt) or `stop` is set; then the last failure is raised, with its numbered fix steps."""
    if open_swarm is None:
        from .run_access import open_swarm
    deadline = time.monotonic() + contact_timeout
    wait, attempt = FIRST_WAIT, 1
    while True:
        try:
            return open_swarm(config)
        except IslesError as exc:
            left = deadline - time.monotonic()
            if not unreachable(exc) or left <= 0 or stop.is_set():
                raise
            pause = min(wait, left)
            say(f"attempt {attempt}: {exc.message}; trying again in {pause:.0f} s (--contact-timeout)")
            if stop.wait(pause):
                raise
            wait, attempt = min(wait * 2, MAX_WAIT), attempt + 1
