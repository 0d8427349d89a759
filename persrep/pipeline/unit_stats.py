"""What each unit cost: seconds and peak memory measured in the unit's own process.

:class:`Measured` wraps a stage's unit function (the runner passes it to ``executor.map``, so
it runs wherever the unit runs: this process with ``LocalExecutor``, a Ray worker with
``RayExecutor``); :func:`measure` does the same inside a unit function that another stage runner
calls (the personalisation unit inside a Tune trial). Each adds to the unit's result:

- ``unit_seconds``: wall seconds of the unit function (not the queueing around it);
- ``peak_rss_bytes``: the peak resident memory of the process *during* the unit. On Linux the
  kernel's high-water mark is reset at the unit's start (``/proc/self/clear_refs`` = 5) and read
  at its end (``VmHWM``); where that is not allowed, the process's lifetime peak
  (``ru_maxrss``, an upper bound) with ``peak_rss_scope: "process"``.

:func:`stage_costs` turns the units' records into ``summary.json``'s ``costs``: per stage and
unit type (the label's first field: ``pretrained`` / ``adapter`` evaluations, the generator, the
data configuration, ...) the units run, seconds (sum, max) and peak RSS (max over units).
Units skipped because they were published earlier cost nothing and are only counted.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")  # reset the peak RSS (VmHWM) of this process
        return True
    except OSError:
        return False


def _peak_since_reset() -> int | None:
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _process_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes, Linux: KiB


@contextlib.contextmanager
def measure(into: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Fill ``into`` with ``unit_seconds`` and ``peak_rss_bytes`` of the enclosed block."""
    scoped = _reset_peak()
    t0 = time.perf_counter()
    try:
        yield into
    finally:
        into["unit_seconds"] = round(time.perf_counter() - t0, 3)
        peak = _peak_since_reset() if scoped else None
        into["peak_rss_bytes"] = peak if peak is not None else _process_peak()
        into["peak_rss_scope"] = "unit" if peak is not None else "process"


class Measured:
    """``fn(ctx, unit)`` with its cost added to the returned dict (picklable for Ray tasks)."""

    def __init__(self, fn: Callable[[Any, Any], dict[str, Any]]):
        self.fn = fn

    def __call__(self, ctx: Any, unit: Any) -> dict[str, Any]:
        cost: dict[str, Any] = {}
        with measure(cost):
            value = self.fn(ctx, unit)
        return {**value, **cost} if isinstance(value, dict) else value


def unit_record(outcome: Any) -> dict[str, Any]:
    """The cost fields of one outcome for ``units.json`` / ``summary.json``."""
    value = outcome.value or {}
    seconds = value.get("unit_seconds", value.get("seconds", outcome.seconds))
    return {"seconds": round(float(seconds), 3) if seconds is not None else None,
            "peak_rss_bytes": value.get("peak_rss_bytes")}


def unit_type(label: str) -> str:
    return label.split(":", 1)[0] if label else "-"


def stage_costs(units: list[dict[str, Any]], stage_seconds: dict[str, float] | None = None
                ) -> dict[str, Any]:
    """Per stage: wall seconds of the stage, and per unit type the units run, skipped and failed,
    seconds (sum, max) and peak RSS (max over units, bytes and GiB)."""
    out: dict[str, Any] = {}
    for u in units:
        stage = out.setdefault(u["stage"], {"stage_seconds": (stage_seconds or {}).get(u["stage"]),
                                            "unit_types": {}})
        t = stage["unit_types"].setdefault(unit_type(u["label"]), {
            "units_run": 0, "skipped": 0, "failed": 0, "seconds_sum": 0.0, "seconds_max": 0.0,
            "peak_rss_max_bytes": None})
        if u["status"] == "skipped":
            t["skipped"] += 1
            continue
        t["failed" if u["status"] == "failed" else "units_run"] += 1
        s = u.get("seconds")
        if s is not None:
            t["seconds_sum"] = round(t["seconds_sum"] + s, 3)
            t["seconds_max"] = round(max(t["seconds_max"], s), 3)
        rss = u.get("peak_rss_bytes")
        if rss:
            t["peak_rss_max_bytes"] = max(t["peak_rss_max_bytes"] or 0, int(rss))
    for stage in out.values():
        for t in stage["unit_types"].values():
            b = t["peak_rss_max_bytes"]
            t["peak_rss_max_gb"] = round(b / 1024 ** 3, 3) if b else None
    return out
