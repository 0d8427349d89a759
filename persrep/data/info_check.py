"""Does the info file agree with the folders? (``<name>_info.json`` vs ``train/<instance>/``)

An info file that names an instance without a folder, a folder the info file does not list,
duplicate names, or a name that is not safe as a single path component (``..``, separators, an
absolute path, control characters, names that differ only by case on a case-insensitive store)
is an **error**: the message names the entry and the fix, and it is found before compute
(``persrep data check`` and every run call :func:`check_info` through ``check_dataset``).

An instance folder without a category in ``class_to_sc`` is an error when the run needs
categories (class prompts, class images, generated category negatives, captions keyed by
category) and a warning naming the fallback category otherwise: never a silent default.
"""

from __future__ import annotations

import json
import unicodedata
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from persrep.data.layout import InstanceDataset


class Findings(Protocol):
    """Where findings go: :class:`persrep.data.check.CheckReport` is one (declared here, so this
    module needs nothing from check.py, which calls it)."""

    def add(self, severity: str, where: str, problem: str, fix: str) -> None: ...

FALLBACK_CATEGORY = "object"  # what layout.open_dataset uses for an instance without a category
NAME_KEYS = ("classes", "class_to_idx", "class_to_sc", "class_to_split")


def unsafe_entry(name: Any) -> str | None:
    """Why ``name`` cannot be one path component (an instance folder), or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if name in ("", ".", ".."):
        return "is empty or a dot name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if ".." in name:
        return "contains '..' (path traversal)"
    if any(unicodedata.category(c).startswith("C") for c in name):
        return "contains a control character"
    return None


def _fold(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _entries(info: dict[str, Any]) -> dict[str, list[Any]]:
    """The names each of the info file's name-keyed fields lists (in file order)."""
    out: dict[str, list[Any]] = {}
    for key in NAME_KEYS:
        val = info.get(key)
        if val is None:
            continue
        if key == "classes":
            out[key] = list(val) if isinstance(val, list) else [val]
        elif isinstance(val, dict):
            out[key] = list(val)
    return out


def read_info(ds: "InstanceDataset") -> dict[str, Any]:
    if not ds.info_file:
        return {}
    try:
        info = json.loads(ds.storage.read_bytes(ds.info_file))
    except (ValueError, OSError):
        return {}  # open_dataset already refused an unreadable info file
    return info if isinstance(info, dict) else {}


def check_info(ds: "InstanceDataset", report: Findings, needs_categories: bool = False) -> None:
    """Add the info-file vs folders findings of ``ds`` to ``report``."""
    info = read_info(ds)
    where = ds.storage.uri(ds.info_file) if ds.info_file else ds.root
    entries = _entries(info)
    folders = set(ds.instances)
    bad_listed = False
    for key, names in entries.items():
        if key == "classes" and not isinstance(info.get("classes"), list):
            report.add("error", where, "'classes' is not a list", "write classes as a JSON list of instance names")
        seen: dict[str, Any] = {}
        for name in names:
            why = unsafe_entry(name)
            if why and name in folders:
                continue  # a folder of that name: check_dataset's name check reports it once
            if why:
                bad_listed = True
                report.add("error", where, f"{key} entry {name!r} {why}: not safe as a folder name",
                           "remove the entry or rename it (letters, digits, '_' or '-')")
                continue
            folded = _fold(name)
            if folded in seen and not (name != seen[folded] and {name, seen[folded]} <= folders):
                # (two folders that differ by case are reported by the folder-name check)
                problem = (f"{key} lists {name!r} twice" if seen[folded] == name else
                           f"{key} entry {name!r} differs only by case/unicode form from "
                           f"{seen[folded]!r} (they clash on a case-insensitive store)")
                report.add("error", where, problem, "keep one entry per instance, each a distinct name")
            seen[folded] = name
            if name not in folders:
                report.add("error", where, f"{key} names instance {name!r} but there is no "
                           f"train/{name}/ or test/{name}/ folder",
                           f"add its folders or remove {name!r} from {key}")
    classes = info.get("classes")
    if isinstance(classes, list) and not bad_listed:
        listed = {c for c in classes if isinstance(c, str)}
        for name in sorted(folders - listed):
            report.add("error", f"instance {name!r}", f"folder not listed in 'classes' of {where}",
                       f"add {name!r} to classes (and class_to_sc), or remove its folders")
    class_to_idx = info.get("class_to_idx")
    if isinstance(class_to_idx, dict):
        by_idx: dict[str, str] = {}
        for name, idx in class_to_idx.items():
            k = json.dumps(idx)
            if k in by_idx:
                report.add("error", where, f"class_to_idx gives {name!r} the index {idx} of {by_idx[k]!r}",
                           "give every instance its own index")
            by_idx[k] = name
    uncategorised = sorted(ds.uncategorised)
    if uncategorised:
        shown = ", ".join(repr(n) for n in uncategorised[:8]) + (" ..." if len(uncategorised) > 8 else "")
        fix = (f"add them to class_to_sc in {ds.info_file or '<name>_info.json'} "
               "(`persrep data import --categories FILE` writes it)")
        if needs_categories:
            report.add("error", where, f"{len(uncategorised)} instance(s) have no category ({shown}) and "
                       "this run needs categories (class prompts, class images, category negatives "
                       "or captions)", fix)
        else:
            report.add("warning", where, f"{len(uncategorised)} instance(s) have no category ({shown}): "
                       f"the fallback category {FALLBACK_CATEGORY!r} is used", fix)
