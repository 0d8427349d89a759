"""The job's progress contract: typed callbacks, each also written as one line.

Executors and stages report through a :class:`Progress`: ``on_stage_start`` (a stage opens with
its number of units and how it runs), ``on_unit`` (one unit finished: done / skipped / failed),
``on_retry`` (a unit is attempted again, and why), ``on_stage_end`` (the stage's counts, time and
outcomes) and a plain call, ``progress(message)`` (any other message: data set, cluster, plan,
notes). The base class turns
each event into the line protocol a log reader knows (``stage NAME: N units``, ``NAME: i/N LABEL
-> STATUS``, ...), so :class:`SayProgress`, the wrapper of a plain ``say(message)`` function,
writes exactly those lines; ``persrep.console.Console`` is the terminal's implementation
(progress bars, per-instance status tables).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class Progress:
    """Progress events of a job; every method has a default (a line), so an implementation
    overrides only what it shows differently."""

    def __call__(self, msg: str) -> None:
        """A message that is not a progress event (data set, cluster, plan, notes, warnings)."""

    def on_stage_start(self, stage: str, n_units: int, how: str = "") -> None:
        self(f"stage {stage}: {n_units} units{f' ({how})' if how else ''}")

    def on_unit(self, stage: str, i: int, n: int, label: str, status: str, attempts: int = 1) -> None:
        """Unit ``i`` of ``n`` finished (``attempts``: said when more than one)."""
        self(f"{stage}: {i}/{n} {label} -> {status}" + (f" after {attempts} attempts" if attempts > 1 else ""))

    def on_retry(self, stage: str, label: str, attempt: int, reason: str) -> None:
        self(f"{stage}: retrying {label} (attempt {attempt}): {reason}")

    def on_stage_end(self, stage: str, counts: dict[str, int], seconds: float, outcomes: Sequence[Any]) -> None:
        self(f"stage {stage}: {counts['done']} done, {counts['skipped']} skipped (finished earlier), "
                  f"{counts['failed']} failed in {seconds:.1f} s")


class SayProgress(Progress):
    """Progress written as lines to a plain ``say(message)`` function (tests, scripts, logs)."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say

    def __call__(self, msg: str) -> None:
        if self.say is not None:
            self.say(msg)


def as_progress(progress: Progress | Callable[[str], None] | None) -> Progress:
    """``progress`` itself when it is a :class:`Progress`, else its ``say`` function wrapped."""
    return progress if isinstance(progress, Progress) else SayProgress(progress)
