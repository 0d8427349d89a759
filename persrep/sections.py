"""The base class of every settings section (pydantic): unknown keys fail, assignments are checked.

Bottom layer: imports nothing from persrep, so a component can declare its own section (e.g.
``persrep/generation/cut_paste_settings.py``) without importing :mod:`persrep.config`, which
assembles the schema from them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # forbid unknown keys (typos fail loudly); validate on assignment so overrides are checked too
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def ordered_range(v: tuple[float, float], upper: float, what: str = "") -> tuple[float, float]:
    """A (min, max) setting with 0 < min <= max <= upper, else one line naming the bounds."""
    lo, hi = v
    if not (0 < lo <= hi <= upper):
        raise ValueError(f"need 0 < min <= max <= {upper:g}{what}, got {list(v)}")
    return v
