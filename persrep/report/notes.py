"""The run's notes sorted for a reader: warnings up front (repeated ones folded into one), the
rest (which weights, which segmenter, synthesis counters) kept for the run details.

- low-confidence automatic masks (one note per instance from the run) become one group that
  names the instances, their images and the threshold, never the masks' hashed folders;
- other warnings that differ only in an instance name, a number or a hashed key fold into one
  group ("N similar warnings");
- informational notes (``backbone X: weights ...``, ``auto masks: segmenter ...``,
  ``synthesis: N rows ... generator loads ...``) are details, not warnings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LOW_MASK = re.compile(r"^auto masks of (?P<inst>\S+): train image\(s\) \[(?P<idx>[^\]]*)\] have confidence "
                      r"< (?P<thr>[\d.]+)")
INFO_PREFIXES = ("backbone ", "diffusion base model", "auto masks: ", "filter: ", "synthesis: ",
                 "nothing to compute", "data: ", "mlflow")


@dataclass
class NoteGroup:
    """One warning as the page shows it: a summary line, and its members when folded."""

    kind: str                  # "masks" | "repeated" | "single"
    summary: str
    items: list[str] = field(default_factory=list)
    low_masks: dict[str, list[int]] = field(default_factory=dict)  # instance -> image indices
    threshold: float | None = None

    @property
    def folded(self) -> bool:
        return self.kind != "single"


def _shape(note: str, instances: set[str]) -> str:
    """The note with its instance names (whole names, hyphens included: ``Red-Beet``), hashed
    keys, index lists (``[0, 2]`` like ``[1]``) and numbers replaced by placeholders."""
    text = note
    if instances:
        names = "|".join(re.escape(n) for n in sorted(instances, key=len, reverse=True))
        text = re.sub(rf"(?<![\w-])({names})(?![\w-])", "{instance}", text)
    text = re.sub(r"\b[0-9a-f]{12,}\b", "{key}", text)
    text = re.sub(r"\[[\d,\s]*\]", "[{n}]", text)
    return re.sub(r"\d+(\.\d+)?", "{n}", text)


def sort_notes(notes: list[str], instances: list[str] | set[str] = ()) -> tuple[list[NoteGroup], list[str]]:
    """(warnings as groups, in first-seen order; informational notes) of ``summary['notes']``."""
    inst = set(instances)
    details: list[str] = []
    masks: NoteGroup | None = None
    by_shape: dict[str, list[str]] = {}
    order: list[tuple[str, str]] = []  # ("masks", "") or ("shape", shape)
    for note in notes:
        note = str(note)
        m = LOW_MASK.match(note)
        if m:
            if masks is None:
                masks = NoteGroup("masks", "", threshold=float(m["thr"]))
                order.append(("masks", ""))
            masks.items.append(note)
            masks.low_masks[m["inst"]] = [int(i) for i in re.findall(r"\d+", m["idx"])]
            continue
        if note.startswith(INFO_PREFIXES):
            details.append(note)
            continue
        shape = _shape(note, inst)
        if shape not in by_shape:
            by_shape[shape] = []
            order.append(("shape", shape))
        by_shape[shape].append(note)
    groups: list[NoteGroup] = []
    for kind, shape in order:
        if kind == "masks":
            n = len(masks.low_masks)
            masks.summary = (f"The automatic masks of {n} instance{'s' if n != 1 else ''} are uncertain "
                             f"(confidence below {masks.threshold:g}): check them below, or give "
                             "train_masks/ (persrep data masks) and run again")
            groups.append(masks)
            continue
        items = by_shape[shape]
        if len(items) == 1:
            groups.append(NoteGroup("single", items[0], items))
        else:
            groups.append(NoteGroup("repeated", f"{len(items)} similar warnings: {items[0]}", items))
    return groups, details


__all__ = ["NoteGroup", "sort_notes"]
