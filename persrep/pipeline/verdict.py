"""Honest units: what a published unit's output may be used for, and the error when it may not.

A synthesis unit is published whatever it drew: its rows are data (every filter attempt with its
score, every row error), and its manifest counts them (:func:`persrep.generation.shards.unit_counts`).
Whether those rows may be *used* is decided here, from the counts and the current settings, every
time the unit is used (when it is drawn, when a re-run finds it published, when an adapter reads
it). So a stricter or looser policy applies at once, without regenerating anything, and a unit
never does something other than what its settings name without saying so:

- more rows that failed to generate than ``synthesis.max_row_errors`` (default 0: any row error
  that survived the row's own retry) -> **failed**, the first error in one line, every distinct
  error in the unit's manifest and each row's error in its shards;
- a positives unit that kept fewer than ``synthesis.filter.min_kept_fraction`` of its requested
  images (filter too strict, generator too poor, rows lost) -> **failed** by default
  (``synthesis.filter.on_empty=fail``), or, when the user allowed it (``on_empty=real_only``), a
  **fallback**: the adapter trains on the real photos and its record, its result rows
  (``positives_used=real_only_fallback``), the summary and the report say so;
- a negatives unit with no image at all -> **failed** (there is no honest substitute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FIX_ERRORS = ("the errors are in the unit's manifest and its shard rows; fix their cause, or allow "
              "some with synthesis.max_row_errors")
FIX_FILTER = ("lower synthesis.filter.threshold, raise synthesis.filter.max_attempts_per_image, or "
              "set synthesis.filter.on_empty=real_only to train such instances on their real photos (labelled)")


class UnitRejected(RuntimeError):
    """A unit ran, but its output may not be used. Not retried: the same inputs give the same rows.

    ``details`` is the failure record (counts, score distribution, every distinct error), kept in
    the run's summary."""

    retryable = False

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = dict(details or {})


def is_retryable(exc: BaseException) -> bool:
    """Whether a unit that raised ``exc`` is retried: the one policy of persrep.pipeline.retry."""
    from persrep.pipeline.retry import is_retryable as policy

    return policy(exc)


@dataclass(frozen=True)
class Verdict:
    status: Literal["ok", "fallback", "failed"]
    line: str = ""  # one line, naming the numbers and the fix (empty when ok)
    details: dict[str, Any] = field(default_factory=dict)

    def raise_if_failed(self, label: str = "") -> "Verdict":
        if self.status == "failed":
            raise UnitRejected(f"{label}: {self.line}" if label else self.line, self.details)
        return self


def _scores(meta: dict[str, Any]) -> str:
    s = meta.get("filter_scores")
    if not s:
        return "no scores"
    return f"scores min {s['min']:.3f} / median {s['median']:.3f} / max {s['max']:.3f} over {s['n']} attempts"


def synthesis_verdict(meta: dict[str, Any], settings: Any) -> Verdict:
    """The verdict on a synthesis unit from its manifest ``meta`` (its counts) and ``settings``."""
    syn = settings.synthesis
    requested = int(meta.get("requested", meta.get("rows", 0)))
    kept, errors = int(meta.get("kept", 0)), int(meta.get("errors", 0))
    negatives = meta.get("generator") == "base"
    details = {k: meta[k] for k in ("group", "generator", "instance", "rows", "requested", "kept", "errors",
                                    "error_messages", "filter_scores") if k in meta}
    if errors > syn.max_row_errors:
        first = (meta.get("error_messages") or ["?"])[0]
        return Verdict("failed", f"{errors} of {requested} rows failed to generate (synthesis.max_row_errors="
                                 f"{syn.max_row_errors}); first: {first}; {FIX_ERRORS}", details)
    if negatives:
        if requested and kept == 0:
            return Verdict("failed", f"no negative image drawn out of {requested}", details)
        return Verdict("ok", "", details)
    flt = syn.filter
    need = flt.min_kept_fraction * requested
    if requested and (kept < need or kept == 0):
        filtered = meta.get("filter_scores") is not None
        what = (f"filter kept {kept} of {requested} requested positives (min {flt.min_kept_fraction:g} "
                f"of them, threshold {flt.threshold:g}; {_scores(meta)})" if filtered else
                f"{kept} of {requested} requested positives drawn (min {flt.min_kept_fraction:g} of them)")
        if flt.on_empty == "real_only":
            return Verdict("fallback", f"{what}; trained on the real photos instead "
                                       "(synthesis.filter.on_empty=real_only)", details)
        return Verdict("failed", f"{what}: {FIX_FILTER}", details)
    return Verdict("ok", "", details)
