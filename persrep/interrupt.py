"""Ctrl-C (SIGINT) and SIGTERM stop a job cleanly: the main thread raises :class:`JobInterrupted`.

A job (``run_all``, ``persrep run``, a sweep) runs inside :func:`stop_on_signals`. Either signal
raises :class:`JobInterrupted` (a ``KeyboardInterrupt``) in the main thread wherever it is: the
job's ``finally`` blocks run (the run lock is released, a local Ray cluster is shut down, which
stops every trial and actor; on an attached cluster the job's actors and tasks die with their
driver), and the entry point prints one line and exits 130 (SIGINT) or 143 (SIGTERM). Nothing
half-published can look finished: units are published manifest-last, so a unit cut short has no
manifest and the next run recomputes it; finished units are skipped (the resume).

Ray Tune's own SIGINT handler (stop the experiment, then *return* from ``fit``) is switched off
(``TUNE_DISABLE_SIGINT_HANDLER``): with it, the pipeline would go on to evaluate after a Ctrl-C.
A second signal while the job is stopping falls back to the default action (immediate exit).
``ray.init`` of a local cluster installs Ray's own SIGTERM handler (kill the node's processes,
then ``sys.exit(1)``, which aborts the connected driver): :func:`reinstall` puts ours back after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class JobInterrupted(KeyboardInterrupt):
    """The job was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


_RECEIVED: list[int] = []  # the signals our handler received in the current stop_on_signals


def _signum(exc: KeyboardInterrupt) -> int:
    """The signal that stopped the job. Ray's core worker turns any ``KeyboardInterrupt`` raised by a
    signal handler while it waits (``ray.get``, ``ray.wait``) into a *new*, plain
    ``KeyboardInterrupt``: the :class:`JobInterrupted` is lost, so the handler's record decides."""
    if isinstance(exc, JobInterrupted):
        return exc.signum
    return _RECEIVED[0] if _RECEIVED else signal.SIGINT


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for SIGINT (and a plain Ctrl-C outside :func:`stop_on_signals`), 143 for SIGTERM."""
    s = _signum(exc)
    return EXIT_CODES.get(s, 128 + s)


def signal_name(exc: KeyboardInterrupt) -> str:
    return signal.Signals(_signum(exc)).name


_ACTIVE: list = []  # our handler while inside stop_on_signals


def reinstall() -> None:
    """Put our handlers back (after a library, e.g. ``ray.init``, replaced them)."""
    if _ACTIVE and threading.current_thread() is threading.main_thread():
        for s in EXIT_CODES:
            signal.signal(s, _ACTIVE[-1])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`JobInterrupted` in the main thread while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    _RECEIVED.clear()

    def handler(signum, _frame):
        _RECEIVED.append(signum)
        for s in EXIT_CODES:  # a second signal: the default action, no second unwinding
            signal.signal(s, signal.SIG_DFL)
        raise JobInterrupted(signum)

    saved = {s: signal.getsignal(s) for s in EXIT_CODES}
    for s in EXIT_CODES:
        signal.signal(s, handler)
    _ACTIVE.append(handler)
    try:
        yield
    finally:
        _ACTIVE.remove(handler)
        for s, h in saved.items():
            signal.signal(s, h)


def run_stoppable(body, argv, prog: str | None, default_prog: str, kept: str) -> int:
    """``body(argv, prog)`` under :func:`stop_on_signals`; a SIGINT / SIGTERM ends it with one line
    (``<prog>: stopped by <signal>; <kept>``) on stderr and exit 130 / 143. The job and sweep mains."""
    import sys

    try:
        with stop_on_signals():
            return body(argv, prog)
    except KeyboardInterrupt as exc:  # read before the next stop_on_signals clears the record
        print(f"{prog or default_prog}: stopped by {signal_name(exc)}; {kept}", file=sys.stderr)
        return exit_code(exc)
