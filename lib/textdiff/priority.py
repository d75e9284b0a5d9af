"""Background work that gives way to requests.

The engine passes ``yield_point()`` between units of work (a batch of backbone windows, a training step). A process
doing background work (training, scoring) installs a hook there, e.g. ``RequestGate.wait``: it blocks while a
foreground request holds the gate, so the request gets the CPU alone after at most one unit of overlap. Niceness
alone does not achieve that on a few cores: both processes' thread pools still share them.
"""
from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

LINGER_S = 3.0  # background work stays paused this long after a request ends
_hook: Callable[[], None] | None = None


def set_yield(hook: Callable[[], None] | None) -> None:
    """Install (None: remove) what ``yield_point`` calls in this process."""
    global _hook
    _hook = hook


def yielding() -> bool:
    """Whether this process gives way (a hook is installed): its work then comes in small units."""
    return _hook is not None


def yield_point() -> None:
    if _hook is not None:
        _hook()


class RequestGate:
    """A folder of marker files, one per request in progress; foreground and background processes share it.

    ``held()`` marks a request for its duration; ``wait()`` returns once no request is marked and none ended in the
    last ``linger_s`` (an annotator's next click or request follows within seconds: the background should not start a
    window between them), or after ``max_wait_s`` (background work is postponed, never starved for good). A marker
    older than ``stale_s`` (left by a killed server) is ignored.
    """

    LAST = "last-request"  # its modification time: when the last request ended

    def __init__(self, folder: str | os.PathLike, linger_s: float = LINGER_S, stale_s: float = 600.0,
                 max_wait_s: float = 120.0, poll_s: float = 0.02):
        self.folder = Path(folder)
        self.linger_s, self.stale_s, self.max_wait_s, self.poll_s = linger_s, stale_s, max_wait_s, poll_s

    @contextmanager
    def held(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / f"{os.getpid()}-{uuid.uuid4().hex}.request"
        marker.touch()
        try:
            yield
        finally:
            (self.folder / self.LAST).touch()
            marker.unlink(missing_ok=True)

    def busy(self) -> bool:
        """A request runs, or one ended less than ``linger_s`` ago."""
        now = time.time()
        try:
            if now - (self.folder / self.LAST).stat().st_mtime < self.linger_s:
                return True
        except OSError:  # no request yet
            pass
        try:
            markers = list(self.folder.glob("*.request"))
        except OSError:
            return False
        for marker in markers:
            try:
                if now - marker.stat().st_mtime < self.stale_s:
                    return True
            except FileNotFoundError:  # the request ended while we looked
                continue
        return False

    def wait(self) -> float:
        """Block while ``busy()``; the seconds waited."""
        start = time.monotonic()
        while self.busy() and time.monotonic() - start < self.max_wait_s:
            time.sleep(self.poll_s)
        return time.monotonic() - start
