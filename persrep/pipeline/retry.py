"""Which unit failures are retried: one policy for every executor.

A unit that fails is retried (``resources.max_retries`` times) only when another attempt could
succeed: a lost worker, a killed actor, a storage hiccup, memory that was short on one node. A
failure that the same inputs raise again (no positives, an empty mask, a tensor of the wrong
shape, a missing key, a corrupt input, a setting the unit cannot use) is *rejected*: reported once,
in one line, after one attempt. Retrying it only burns the time of ``max_retries`` more attempts
(and, on Ray, holds a GPU meanwhile) before giving the same answer.

Every executor asks the one :data:`POLICY` object: the in-process loop
(``LocalExecutor``), Ray tasks (``RayExecutor``), Tune trials (``tune_stage.personalize_trial``:
a rejected trial reports its failure instead of raising, so Tune does not restart it) and the
Ray Data synthesis stage (a generator that cannot be loaded for a deterministic reason is not
loaded again in a later pass).

The decision, in order:

1. an exception's own ``retryable`` attribute (``UnitRejected`` and ``CorruptUnitError``: False);
2. transient kinds, retried: storage errors (an s3 endpoint down for a few seconds), caption
   endpoint errors (HTTP 5xx), ``OSError``, ``MemoryError``, ``TimeoutError``;
3. deterministic kinds, rejected: every user error (settings, data, models), ``ValueError``,
   ``TypeError``, ``LookupError`` (``KeyError``, ``IndexError``), ``AttributeError``,
   ``ArithmeticError``, ``NotImplementedError``, ``AssertionError``, and a ``RuntimeError`` whose
   message is a tensor shape mismatch (PyTorch raises those as ``RuntimeError``; out-of-memory
   errors are not shape errors and stay retried);
4. anything else (Ray's worker and actor errors, other ``RuntimeError``): retried.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from persrep.errors import CaptionError, StorageError, UserError

_SHAPE = re.compile(r"shape|size mismatch|sizes? of tensors? must match|must match the size|"
                    r"mat1 and mat2|dimension out of range|expected .* dimensions?|"
                    r"number of dimensions|not broadcastable|cannot be multiplied", re.I)


@dataclass(frozen=True)
class RetryPolicy:
    transient: tuple[type[BaseException], ...] = (StorageError, CaptionError, OSError, MemoryError,
                                                  TimeoutError)
    deterministic: tuple[type[BaseException], ...] = (UserError, ValueError, TypeError, LookupError,
                                                      AttributeError, ArithmeticError,
                                                      NotImplementedError, AssertionError)

    def retryable(self, exc: BaseException) -> bool:
        """Whether another attempt of the unit that raised ``exc`` could succeed."""
        flag = getattr(exc, "retryable", None)
        if isinstance(flag, bool):
            return flag
        if isinstance(exc, self.transient):
            return True
        if isinstance(exc, self.deterministic):
            return False
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower() \
                and _SHAPE.search(str(exc)):
            return False
        return True

    def gives_up(self, exc: BaseException, attempt: int, max_retries: int) -> bool:
        """Whether a unit that raised ``exc`` on ``attempt`` (1-based) is reported now: its
        retries are spent, or another attempt would raise the same (rejected)."""
        return attempt > max_retries or not self.retryable(exc)

    def error(self, exc: BaseException) -> str:
        """A failed unit's one-line error: the rejection's own line, or the type and first line."""
        if not self.retryable(exc):
            return self.line(exc)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {text}"[:300]

    def line(self, exc: BaseException) -> str:
        """A rejected failure's one line: the exception's own first line (a user error or a
        rejection already names the setting and the fix), else its type and first line."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if getattr(exc, "retryable", None) is False or isinstance(exc, UserError):
            return text[:500] or type(exc).__name__
        return f"{type(exc).__name__}: {text}"[:480] + " (not retried: the same inputs raise it again)"


POLICY = RetryPolicy()  # the one policy: every executor and stage runner asks it
