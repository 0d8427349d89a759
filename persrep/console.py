"""The job's terminal: progress bars per stage, per-instance status tables, one-line failures.

The pipeline reports through a :class:`persrep.pipeline.progress.Progress`: typed events
(``on_stage_start``, ``on_unit``, ``on_retry``, ``on_stage_end``) and plain messages
(``progress(message)``). :class:`Console` is the Progress of ``persrep run`` /
``ray_jobs/run_all.py`` and turns them into what a person wants to watch. Each event is handled
as its line of the line protocol would be (the same lines are read when a message arrives as
text, e.g. from a component that only has a ``say`` function):

- ``stage NAME: N units [(how)]`` opens a stage: a progress bar (units done / total, failures,
  ETA) on a terminal, or, when the output is not a TTY (CI, ``ray job submit`` logs, a file),
  a plain progress line at every quarter of the stage and at most every ``plain_every_s`` s;
- ``NAME: i/N LABEL -> STATUS [after k attempts]`` advances it (LABEL ends with the instance);
- ``NAME: retrying LABEL (attempt k): REASON`` prints a ``RETRIED`` line with the one-line reason;
- ``stage NAME: ... in T s`` closes the stage; ``on_stage_end`` then prints the stage's
  per-instance status table (:meth:`Console.stage_outcomes`; rows: instance, columns: the rest of
  the unit label, cells: done / skipped / FAILED, with attempts).

Other messages print as they come when no stage is open (data set, cluster, notes); inside a
stage they are details and go to the log only, except warnings. Messages that start with
whitespace (the runner's own status-table rows) are details too.

:meth:`Console.capture` sends everything else written to this process's stdout and stderr (Ray's,
Ray Data's, Tune's and MLflow's own logging, warnings, worker output forwarded by Ray) to a log
file, at the file-descriptor level, so C++ and subprocess output is caught as well; the console
keeps private copies of the real stdout / stderr. ``verbose=True`` captures nothing.

rich, not tqdm: one library gives the live bar with custom fields (failures), the tables and
log lines printed above a live bar without tearing it; its non-terminal mode is off, and plain
lines are written instead (a bar redrawn with carriage returns is noise in a CI log).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from persrep.pipeline.progress import Progress

STAGE_START = re.compile(r"^stage (?P<stage>\w+): (?P<n>\d+) units\b")
STAGE_END = re.compile(r"^stage (?P<stage>\w+): \d+ done, .* in [\d.]+ s$")
UNIT_DONE = re.compile(r"^(?P<stage>\w+): (?P<i>\d+)/(?P<n>\d+) (?P<label>\S+) -> (?P<status>\w+)"
                       r"(?: after (?P<attempts>\d+) attempts)?$")
UNIT_RETRY = re.compile(r"^(?P<stage>\w+): retrying (?P<label>\S+) \(attempt (?P<attempt>\d+)\): "
                        r"(?P<reason>.*)$")
# said inside a stage: shown (the cluster's start and the memory plan come at the first unit to
# compute, so inside that unit's stage)
IMPORTANT = re.compile(r"(?i:warning)|ERROR|Error:|RETRIED|FAILED|^plan \w+:|^ray: ")


def failure_file(label: str) -> str:
    """``failures/<unit>.txt``: where a failed unit's full traceback is kept in the run directory."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_") or "unit"
    return f"failures/{safe[:150]}.txt"


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def failure_text(trace: str) -> str:
    """A traceback as plain text (Ray colours its worker names with ANSI codes)."""
    return ANSI.sub("", trace)


def _eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Stage:
    def __init__(self, name: str, total: int):
        self.name, self.total = name, total
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self.last_plain = self.t0
        self.quarter = 0
        self.task: Any = None

    def eta(self) -> float | None:
        if not self.done:
            return None
        return (time.monotonic() - self.t0) / self.done * max(0, self.total - self.done)


class Console(Progress):
    """The progress of a job, written to the terminal (see the module docstring)."""

    def __init__(self, verbose: bool = False, interactive: bool | None = None,
                 plain_every_s: float = 30.0):
        self.verbose = verbose
        self._interactive = interactive
        self.plain_every_s = plain_every_s
        self._out: IO[str] | None = None  # private copies while capturing
        self._err: IO[str] | None = None
        self.log_path: Path | None = None
        self.stage: _Stage | None = None
        self._progress: Any = None  # rich.progress.Progress while a stage is open on a TTY
        self._rich: Any = None
        self.aliases: dict[str, str] = {}  # label part -> readable name (data config key -> label)

    # -- streams --------------------------------------------------------------------------------
    @property
    def out(self) -> IO[str]:
        return self._out or sys.stdout

    @property
    def err(self) -> IO[str]:
        return self._err or sys.stderr

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        try:
            return self.err.isatty()
        except (AttributeError, ValueError):
            return False

    def _rich_console(self) -> Any:
        from rich.console import Console as RichConsole

        if self._rich is None or self._rich.file is not self.err:
            self._rich = RichConsole(file=self.err, force_terminal=self.interactive,
                                     highlight=False, soft_wrap=True,
                                     width=None if self.interactive else 160)
        return self._rich

    def line(self, text: str) -> None:
        """One line on the terminal's stderr, timestamped (and in the log, when capturing)."""
        stamped = f"[{time.strftime('%H:%M:%S')}] {text}"
        if self._progress is not None:
            self._progress.console.print(stamped, markup=False, highlight=False)
        else:
            print(stamped, file=self.err, flush=True)
        self._log(stamped)

    def _log(self, text: str) -> None:
        if self._err is not None and self._err is not sys.stderr:  # capturing: sys.stderr is the log
            print(text, file=sys.stderr, flush=True)

    def print_out(self, text: str = "") -> None:
        """Result text (the summary table) on stdout, and in the log."""
        print(text, file=self.out, flush=True)
        if self._out is not None and self._out is not sys.stdout:
            print(text, file=sys.stdout, flush=True)

    # -- the say callback -----------------------------------------------------------------------
    def __call__(self, msg: str) -> None:
        msg = str(msg)
        if m := STAGE_START.match(msg):
            self._open(m["stage"], int(m["n"]), msg)
            return
        if m := UNIT_DONE.match(msg):
            if self.stage is not None and m["stage"] == self.stage.name:
                self._advance(m["status"], int(m["i"]), int(m["n"]))
                self._log(msg)
                return
        if m := UNIT_RETRY.match(msg):
            self.line(f"RETRIED {m['stage']} {m['label']} (attempt {m['attempt']}): {m['reason']}")
            return
        if m := STAGE_END.match(msg):
            self._close()
            self.line(msg)
            return
        if msg.startswith(("RETRIED ", "FAILED ")) and self.stage is None and self._err is not None:
            self._log(msg)  # the job prints these with the summary (naming the failure files)
            return
        detail = msg[:1].isspace() or (self.stage is not None and not IMPORTANT.search(msg))
        if detail and not self.verbose:
            self._log(f"[{time.strftime('%H:%M:%S')}] {msg}")
        else:
            self.line(msg)

    # -- the typed events (persrep.pipeline.progress.Progress) --------------------------------
    def on_stage_start(self, stage: str, n_units: int, how: str = "") -> None:
        self._open(stage, n_units, f"stage {stage}: {n_units} units{f' ({how})' if how else ''}")

    def on_unit(self, stage: str, i: int, n: int, label: str, status: str, attempts: int = 1) -> None:
        if self.stage is not None and stage == self.stage.name:
            self._advance(status, i, n)
            self._log(f"{stage}: {i}/{n} {label} -> {status}" + (f" after {attempts} attempts" if attempts > 1 else ""))
        else:
            super().on_unit(stage, i, n, label, status, attempts)

    def on_retry(self, stage: str, label: str, attempt: int, reason: str) -> None:
        self.line(f"RETRIED {stage} {label} (attempt {attempt}): {reason}")

    def on_stage_end(self, stage: str, counts: dict[str, int], seconds: float, outcomes: Sequence[Any]) -> None:
        self._close()
        self.line(f"stage {stage}: {counts['done']} done, {counts['skipped']} skipped (finished earlier), "
                  f"{counts['failed']} failed in {seconds:.1f} s")
        self.stage_outcomes(stage, outcomes)

    def _open(self, name: str, total: int, msg: str) -> None:
        self._close()
        self.line(msg)
        self.stage = _Stage(name, total)
        if self.interactive and total > 0:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      console=self._rich_console(), transient=True)
            self._progress.start()
            self.stage.task = self._progress.add_task(name, total=total, failed=0)

    def _advance(self, status: str, i: int, n: int) -> None:
        st = self.stage
        assert st is not None
        st.done = max(st.done + 1, i)
        st.total = max(st.total, n)
        st.failed += status == "failed"
        if self._progress is not None:
            self._progress.update(st.task, completed=st.done, total=st.total, failed=st.failed)
            return
        quarter = 4 * st.done // max(1, st.total)
        now = time.monotonic()
        if st.done < st.total and (quarter > st.quarter or now - st.last_plain >= self.plain_every_s):
            st.quarter, st.last_plain = quarter, now
            self.line(f"  {st.name} {st.done}/{st.total} units, {st.failed} failed, "
                      f"ETA {_eta(st.eta())}")

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.stage = None

    def stage_outcomes(self, stage: str, outcomes: Sequence[Any]) -> None:
        """The per-instance status table of a finished stage (``on_stage_end``)."""
        if not outcomes:
            return
        rows, cols = status_table(outcomes, self.aliases)
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE, pad_edge=False, show_edge=False, title=None)
        table.add_column("instance")
        for c in cols:
            table.add_column(c)
        for inst, cells in rows.items():
            table.add_row(inst, *[cells.get(c, "") for c in cols])
        con = self._rich_console()
        with con.capture() as cap:
            con.print(table)
        text = cap.get().rstrip("\n")
        print(text, file=self.err, flush=True)
        self._log(text)

    # -- the summary ----------------------------------------------------------------------------
    def summary(self, summary: Any) -> None:
        """The summary table (stdout), then one line per retried and failed unit."""
        self.print_out(summary.table)
        self.print_out(f"\nresults: {summary.run_uri}   stages: {summary.stages}   "
                       f"total {summary.timings.get('total')} s")
        if self.log_path is not None:
            self.print_out(f"log: {self.log_path}")
        for r in summary.retries:
            self.print_out(f"RETRIED {r['stage']} {r['unit']}: {r['attempts']} attempts, {r['status']}")
        for f in summary.failures:
            where = (f" (traceback: {summary.run_uri}/{failure_file(f['unit'])})"
                     if summary.run_uri and f["unit"] in summary.traces else "")
            self.print_out(f"FAILED {f['stage']} {f['unit']}: {f['error']}{where}")

    # -- capturing everyone else's output -------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, log_path: str | Path | None) -> Iterator[None]:
        """Send fd 1 and 2 (and so ``sys.stdout`` / ``sys.stderr``) to ``log_path`` for the block."""
        if self.verbose or log_path is None:
            yield
            return
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        # the console writes to the real terminal: a copy of the fd, unless a test harness
        # replaced sys.stdout / sys.stderr with its own objects (then keep writing to those)
        self._out = _own_stream(sys.stdout, 1, saved[1])
        self._err = _own_stream(sys.stderr, 2, saved[2])
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.log_path = path
        try:
            yield
        finally:
            self._close()
            for s in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    s.flush()
            for stream in (self._out, self._err):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[1], 1)
            os.dup2(saved[2], 2)
            for stream, fd in ((self._out, saved[1]), (self._err, saved[2])):
                if getattr(stream, "_persrep_own", False):
                    stream.close()  # closes its own dup
                os.close(fd)
            self._out = self._err = None


def _own_stream(current: IO[str], fd: int, saved_fd: int) -> IO[str]:
    try:
        real = current.fileno() == fd
    except (AttributeError, ValueError, OSError):
        real = False
    if not real:
        return current
    stream = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
    stream._persrep_own = True  # type: ignore[attr-defined]
    return stream


def status_table(outcomes: Sequence[Any], aliases: dict[str, str] | None = None,
                 ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Rows (instance = the label's last ``:`` part) x columns (the rest) of status cells.

    A label part shared by every column (the one backbone of a run) is left out of the headers;
    ``aliases`` renames label parts (a synthesis group's data config key -> the config's label)."""
    aliases = aliases or {}
    split = [o.label.rsplit(":", 1) if ":" in o.label else ["", o.label] for o in outcomes]
    prefixes = [[aliases.get(x, x) for x in p.split(":")] for p, _ in split]
    width = max(len(p) for p in prefixes)
    same = [j for j in range(width) if len({tuple(p[j:j + 1]) for p in prefixes}) == 1]
    cols_of = [":".join(x for j, x in enumerate(p) if j not in same or len(p) == 1) or "unit"
               for p in prefixes]
    rows: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for (_, inst), col, o in zip(split, cols_of, outcomes):
        if col not in cols:
            cols.append(col)
        cell = "FAILED" if o.status == "failed" else o.status
        if getattr(o, "attempts", 1) > 1:
            cell += f" ({o.attempts} tries)"
        rows.setdefault(inst, {})[col] = cell
    return dict(sorted(rows.items())), cols
