"""Progress of the steps that can take more than a few seconds (a data step, locality verdicts, pre-edit probes,
key statistics), so that a user watching a sweep never looks at a silent screen for minutes.

A step announces itself when it starts, reports its count at most every :data:`EVERY_S` seconds while it runs,
and says when it ended and how long it took. Where that goes: ``logging`` (INFO, logger ``bench.progress``) by
default, which trial workers show; a command line tool that shows no INFO logs (``bench.run``'s driver) sends it
to a stream with :func:`show_on`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

log = logging.getLogger("bench.progress")

EVERY_S = 10.0  #: seconds between two count reports of one step
_stream: TextIO | None = None


def show_on(stream: TextIO | None) -> None:
    """Write progress lines to ``stream`` (flushed per line) instead of logging them; ``None`` goes back to
    logging."""
    global _stream
    _stream = stream


def _say(text: str) -> None:
    if _stream is not None:
        print(text, file=_stream, flush=True)
    else:
        log.info("%s", text)


Count = Callable[[int, int], None]


@contextmanager
def step(what: str) -> Iterator[Count]:
    """Announce ``what``, yield ``count(done, total)`` for the step to call as it goes (reported at most every
    :data:`EVERY_S` seconds), and report the step's end with its time. A step that raises reports nothing more:
    its error is the caller's to tell."""
    t0 = time.monotonic()
    last = t0
    _say(f"{what} ...")

    def count(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= EVERY_S and done < total:
            last = now
            _say(f"{what}: {done}/{total} ({now - t0:.0f} s)")

    yield count
    _say(f"{what}: done in {time.monotonic() - t0:.1f} s")
