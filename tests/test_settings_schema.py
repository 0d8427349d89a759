"""Every setting, tried with hostile values as a new user would (issue #29), through the pre-flight only.

The fields are enumerated from the pydantic model (:class:`persrep.config.Settings`, nested
sections, lists of sections), so a new setting is covered the day it is added. Each gets the edge
and invalid values of its type: 0, -1, just past its bounds, empty, the wrong type, an unknown
choice, ``null``; path-like strings get a path that does not exist, a file where a folder is
expected, a folder where a file is expected, and an unreachable URI. Each value is applied as a
command-line override on the tiny toy settings and must be, without Ray and without computing a unit:

- **refused** with a :class:`~persrep.errors.UserError` (what the command line prints in one
  line per problem, exit 2) whose text names the setting (its dotted key or its last part) or the
  bad value, on a single line; or
- **accepted**: settings valid *and* the run's pre-flight passes (``prepare_run``: storage, data,
  models, every input path; then the memory plan). Tracking is connected as the job does.

Anything else (a traceback: an exception that is not a UserError) fails the test, naming the
key and value. Some settings only matter with others (the captions file with caption source
``captions``): :data:`CONTEXT` adds those, so the value is actually used.

A few accepted edge values then run the tiny job in-process (``--no-ray``): it must end with exit
0 or 1, one line per failed unit. The figures (fields, values, refused, accepted) are printed.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types as at
import pytest
from pydantic import BaseModel

from persrep.config import Settings, load_settings
from persrep.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from worlds import TINY  # noqa: E402

# settings that make the key's value used by the run (otherwise it is accepted and never read)
CONTEXT: dict[str, list[str]] = {
    "synthesis.captions_file": ["synthesis.caption_sources=[captions]"],
    "synthesis.captions.model": ["synthesis.caption_sources=[llm]"],
    "synthesis.captions.endpoint": ["synthesis.caption_sources=[llm]"],
    "synthesis.prompts": ["synthesis.caption_sources=[prompts]"],
    "personalization.external_negatives": ["personalization.negatives=external"],
    "synthesis.filter": ["synthesis.filter.enabled=true", "synthesis.filter.scorer=embedding"],
    "tracking": ["tracking.enabled=true", "tracking.required=true"],
    "segmentation.model": ["segmentation.segmenter=sam", "generator.auto_masks=true"],
}
# string settings that name a file, a folder, a model or a URI (besides the model's own list)
PATHS = {"data.path", "storage.root", "storage.s3_endpoint", "generator.base_model", "synthesis.captions_file",
         "generator.cut_paste.backgrounds", "personalization.external_negatives", "tracking.uri",
         "synthesis.captions.model", "synthesis.captions.endpoint", "segmentation.model",
         "personalization.backbones.weights"}
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: nothing listens


def _unwrap(ann: Any) -> tuple[Any, bool]:
    """(annotation without ``None``, whether ``None`` is allowed)."""
    if get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return (args[0] if len(args) == 1 else ann), len(args) < len(get_args(ann))
    return ann, False


def _bounds(field) -> dict[str, float]:
    out = {}
    for m in field.metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if isinstance(m, getattr(at, {"ge": "Ge", "gt": "Gt", "le": "Le", "lt": "Lt",
                                          "min_length": "MinLen", "max_length": "MaxLen"}[name])):
                out[name] = getattr(m, name)
    return out


def leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, annotation, FieldInfo) of every field; sections are fields too (a scalar
    where a mapping is expected), and their own fields are enumerated."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann, _ = _unwrap(field.annotation)
        out.append((key, field.annotation, field))
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaves(ann, key + ".")
        elif get_origin(ann) is list and isinstance(get_args(ann)[0], type) and issubclass(get_args(ann)[0], BaseModel):
            out += leaves(get_args(ann)[0], key + ".")  # list items: key.<field> (applied to item 0)
    return out


def edge_values(key: str, annotation: Any, field, tmp: Path) -> list[Any]:
    ann, optional = _unwrap(annotation)
    b = _bounds(field)
    vals: list[Any] = [None] if optional else []
    origin = get_origin(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ["not-a-section", 0, []]
    if origin is Literal:
        return vals + ["bogus", "", 0]
    if ann is bool:
        return vals + ["maybe", 2]
    if ann in (int, float):
        nums = {0, -1, 1}
        for name, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            if name in b:
                nums |= {b[name], b[name] + (delta if ann is int else delta * 1e-3)}
        if ann is float:
            nums |= {1e-9}
        return vals + sorted(nums) + ["abc", [1]]
    if origin is tuple:
        return vals + [[], [1.0], [0.9, 0.1], [0, 0], "abc"]
    if origin is list:
        item = get_args(ann)[0]
        out = vals + [[], "abc", [None]]
        if get_origin(item) is Literal or item is str:
            out += [["bogus"], ["", ""]]
        if item in (float, int):
            out += [[-1], [1e6]]
        if isinstance(item, type) and issubclass(item, BaseModel):
            out += [[{}], [{"name": "no_such_model_xyz"}]]
        return out
    if ann is str:
        out = vals + ["", " ", 0]
        if key in PATHS:
            a_file = tmp / "a_file.json"
            out += ["/nonexistent/x", str(a_file), str(tmp), UNREACHABLE, "s3://no-such-bucket-xyz/p"]
        return out
    return vals + ["abc"]


def _yaml(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML; parse_override reads it back


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny toy world on disk, a file and a folder to point settings at, the base overrides."""
    from persrep.pipeline.context import prepare_run

    tmp = tmp_path_factory.mktemp("schema")
    (tmp / "a_file.json").write_text("{}")
    base = [*TINY, "generator.types=[real_only, cut_paste, dreambooth]", "tracking.enabled=false",
            "generator.cut_paste.backgrounds=@data/backgrounds", f"storage.root={tmp / 'root'}"]
    ctx = prepare_run(load_settings("local", base), run_id="gen")
    return {"tmp": tmp, "base": [*base, f"data.path={ctx.data_path}"]}


def preflight(overrides: list[str]) -> None:
    """What a run does before its first unit: validation, tracking, ``prepare_run``, the memory plan."""
    from persrep.pipeline.context import prepare_run
    from persrep.pipeline.executor import LocalExecutor
    from persrep.pipeline.resource_plan import plan_resources
    from persrep.tracking import Tracker

    settings = load_settings("local", overrides)
    if settings.tracking.enabled:
        Tracker.from_settings(settings, say=lambda _m: None).connect()
    ctx = prepare_run(settings, run_id="schema")
    plan_resources(ctx, LocalExecutor(), lambda _m: None)


def _context(key: str) -> list[str]:
    out = []
    for k, extra in CONTEXT.items():
        if key == k or key.startswith(k + "."):
            out += [e for e in extra if not e.startswith(key + "=")]
    return out


def test_every_setting_edge_value_is_refused_in_one_line_or_passes_the_preflight(world, capsys):
    tmp, base = world["tmp"], world["base"]
    fields = leaves(Settings)
    tried = refused = accepted = 0
    problems: list[str] = []
    accepted_values: list[str] = []
    for key, ann, field in fields:
        if key.startswith("personalization.backbones."):
            setting = key.rsplit(".", 1)[1]
            prefix = "personalization.backbones"
        else:
            setting, prefix = None, None
        for value in edge_values(key, ann, field, tmp):
            if setting is not None:  # a field of the backbone list's item
                item = {"name": "tf_efficientnet_lite0", "weights": "offline", "image_size": 64, setting: value}
                override = f"{prefix}={_yaml([item])}"
            else:
                override = f"{key}={_yaml(value)}"
            tried += 1
            try:
                preflight([*base, *_context(key), override])
            except UserError as exc:
                refused += 1
                text = str(exc)
                lines = text.splitlines()
                shown = [v for v in (value if isinstance(value, list) else [value]) for v in
                         (v.values() if isinstance(v, dict) else [v]) if isinstance(v, str) and v.strip()]
                named = [ln for ln in lines if key in ln or key.rsplit(".", 1)[-1] in ln
                         or any(v in ln for v in shown)]
                if not named:
                    problems.append(f"{override}: refused without naming the setting: {text[:300]}")
                elif any(len(ln) > 600 for ln in lines) or len(lines) > 3:
                    problems.append(f"{override}: refused in {len(lines)} line(s) of up to "
                                    f"{max(map(len, lines))} characters: {text[:300]}")
            except Exception as exc:  # noqa: BLE001 - a traceback for the user: the finding
                problems.append(f"{override}: {type(exc).__name__} (not a one-line refusal): "
                                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
            else:
                accepted += 1
                accepted_values.append(override)
    with capsys.disabled():
        print(f"\nsettings schema: {len(fields)} fields, {tried} values tried: {refused} refused in one "
              f"line, {accepted} accepted by the pre-flight, {len(problems)} problems")
        if "-v" in sys.argv or "-vv" in sys.argv:
            print("accepted:\n  " + "\n  ".join(accepted_values))
    assert tried > 3 * len(fields)
    assert not problems, "\n".join(problems)


# accepted edge values, run end to end in-process: exit 0 or 1, one line per failed unit
EDGE_RUNS = [
    ["resources.max_retries=0", "synthesis.num_positives=1", "synthesis.rows_per_shard=1",
     "personalization.batch_size=1", "personalization.max_steps=1", "evaluation.batch_size=1",
     "personalization.lora.rank=1", "synthesis.filter.enabled=true", "synthesis.filter.scorer=embedding", "synthesis.filter.threshold=1",
     "synthesis.filter.max_attempts_per_image=1", "data.max_instances=1"],
]


@pytest.mark.parametrize("extra", EDGE_RUNS, ids=lambda e: f"{len(e)}-edge-values")
def test_accepted_edge_values_run_to_exit_0_or_1(world, extra):
    from persrep.pipeline import run_pipeline
    from persrep.pipeline.executor import LocalExecutor

    said: list[str] = []
    settings = load_settings("local", [*world["base"], "generator.types=[real_only, cut_paste]",
                                       "evaluation.tasks=[classification]", *extra])
    summary = run_pipeline(settings, said.append, LocalExecutor(settings.resources.max_retries, said.append),
                           run_id="edges")
    print(f"edge run: stages {summary.stages}, exit {summary.exit_code}, failures {summary.failures}")
    assert summary.exit_code in (0, 1)
    assert sum(c["done"] for c in summary.stages.values()) > 0  # it ran units, not only a plan
    failed = [ln for ln in said if ln.startswith("FAILED ")]
    assert len(failed) == len(summary.failures)
    assert all("\n" not in ln for ln in failed)
