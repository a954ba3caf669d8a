"""Children die with their parent: a killed `isles` command (kill -9, the OOM killer) leaves no DHT process or p2p
daemon behind still holding the peer's identity. `children_die_with_me()` once, at start; `descendants(pid)` lists
what a process left running (the tests use it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

WATCH_PERIOD = 0.2  # seconds between looks at the parent: a killed volunteer's children are gone within ~0.5 s

_installed = False
_forking_pid = 0  # set in the parent just before each fork; the child reads its copy


def children_die_with_me() -> None:
    """Every process this one forks from now on (hivemind's DHT process first) watches us, and when we are gone it
    kills its own children (the p2p daemon) and exits.

    A watchdog thread on the parent pid, not prctl(PR_SET_PDEATHSIG): the kernel sends that signal when the *thread*
    that forked exits, not the process, and a DHT process killed outright by it could not take its daemon along (the
    daemon is started by the DHT process through uvloop, where no fork hook of ours runs)."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_remember_parent, after_in_child=_watch_parent)
    _installed = True


def die_with_parent() -> None:
    """This process, too, exits (with its children) when its parent is gone: for the ranks torchrun starts, which are
    not forked by an isles process."""
    threading.Thread(target=_watchdog, args=(os.getppid(),), name="parent-watchdog", daemon=True).start()


def _remember_parent() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _watch_parent() -> None:
    parent = _forking_pid
    threading.Thread(target=_watchdog, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watchdog(parent: int) -> None:
    stop = threading.Event()  # never set: wait() is a sleep that is not interrupted by signals
    while os.getppid() == parent:
        stop.wait(WATCH_PERIOD)
    children = descendants(os.getpid())
    sockets = [path for pid in children for path in daemon_sockets(pid)]
    for pid in reversed(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for path in sockets:  # what hivemind removes on a clean shutdown
        try:
            os.remove(path)
        except OSError:
            pass
    os._exit(1)


def daemon_sockets(pid: int) -> list[str]:
    """The Unix sockets of a hivemind p2p daemon (its control socket, from its command line, and its client's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return []
    for arg in args:
        if arg.startswith("-listen=/unix/") and "hivemind-p2pd-" in arg:
            path = arg.removeprefix("-listen=/unix")
            return [path, path.replace("hivemind-p2pd-", "hivemind-p2pclient-")]
    return []


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, parents before their children (from /proc on Linux, `pgrep -P` elsewhere)."""
    children = _children_table()
    found, queue = [], [pid]
    while queue:
        for child in children(queue.pop(0)):
            found.append(child)
            queue.append(child)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children_table():
    if os.path.isdir("/proc/self/task"):
        by_parent: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:  # exited while we looked
                continue
            if fields and fields[0] != "Z":
                by_parent.setdefault(int(fields[1]), []).append(int(entry))
        return lambda pid: by_parent.get(pid, [])

    def pgrep(pid: int) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
        return [int(x) for x in out.split()]

    return pgrep
