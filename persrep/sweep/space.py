"""Sweep spaces (``tune_spaces/*.yaml``): parsed, validated and expanded before any compute.

A space file names a base configuration, the metric to optimise and, under ``space:``, one
*dimension* per settings key (the dotted paths of ``key.sub=value`` overrides)::

    config: local                       # named configuration or a YAML path
    overrides: {generator.dreambooth.steps: 10}   # or a list of "key.sub=value" strings
    metric: retrieval.ndcg              # task.metric; objective = mean over instances (personalised)
    mode: max                           # or min
    search: grid                        # grid | random | optuna
    num_samples: 1                      # random: samples per grid point; optuna: trials
    max_concurrent: 2                   # optional cap on concurrent trials
    early_stopping: {type: asha, grace: 2}   # optional; ASHA over instances done
    seed: 0
    space:
      generator.types: {grid: [real_only, cut_paste]}        # data key: generated before trials
      personalization.lora.rank: {grid: [4, 8]}             # trial key
      personalization.learning_rate: {loguniform: [1e-4, 1e-2]}

Distributions: ``grid: [v, ...]`` (every value; random search crosses grid dimensions),
``choice: [v, ...]`` (one value sampled), ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``
(``0 < lo``), ``randint: [lo, hi]`` (integers, both ends included). A scalar value for a
list-valued setting (``generator.types``, ``synthesis.cfg``, ``synthesis.caption_sources``)
means a one-element list: each trial uses one generator type / CFG / caption source.

*Data keys* (``generator.*``, ``synthesis.*``, ``personalization.negatives`` and
``personalization.external_negatives``) change the synthetic data: they must be ``grid`` or
``choice`` (their data is generated once, before the trials, for every value). *Trial keys*
(``personalization.*``, ``evaluation.*``) change only personalisation and evaluation.
``data.*``, ``storage.*``, ``tracking.*``, ``resources.*`` are not sweepable (use overrides).

Validation builds the full settings for every data combination and for every corner value of
every trial dimension (lo and hi of ranges, every listed value), so a bad value fails here, with
one line per problem naming the file, the key and the fix (:class:`SweepError`, exit 2).
No Ray here.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from persrep.config import ConfigError, Settings, load_settings

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
CATEGORICAL = ("grid", "choice")
DATA_PREFIXES = ("generator.", "synthesis.")
DATA_EXTRA = ("personalization.negatives", "personalization.external_negatives")
TRIAL_PREFIXES = ("personalization.", "evaluation.")
OPTUNA_REQUIREMENT = "optuna>=5.0,<6"  # as in pyproject.toml (tests/test_sweep.py checks they agree)
NOT_SWEEPABLE = ("data", "storage", "tracking", "resources", "name")
MAX_DATA_COMBINATIONS = 1000
EXAMPLE_DIM = "personalization.lora.rank: {grid: [4, 8]}"


class SweepError(ConfigError):
    """A sweep space problem found before any compute. ``str()`` is one line per problem."""


def _show(value: Any) -> str:
    return json.dumps(value, default=str)[:80]


# ---------------------------------------------------------------------------------------------
# the file format
class Dimension(BaseModel):
    """One swept settings key: exactly one of grid / choice / uniform / loguniform / randint."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None
    randint: list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping with one of {', '.join(DISTRIBUTIONS)}, "
                             f"e.g. {{grid: [4, 8]}}, got {_show(data)}")
        unknown = [k for k in data if k not in DISTRIBUTIONS]
        if unknown:
            raise ValueError(f"unknown distribution {unknown[0]!r}: use one of {', '.join(DISTRIBUTIONS)}")
        if len(data) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}, got "
                             f"{sorted(data) or 'none'}")
        kind, values = next(iter(data.items()))
        if not isinstance(values, list):
            raise ValueError(f"{kind}: expected a list, e.g. {kind}: [1, 2], got {_show(values)}")
        if kind in CATEGORICAL:
            if not values:
                raise ValueError(f"{kind}: empty list: list at least one value")
            seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
            if len(set(seen)) != len(seen):
                raise ValueError(f"{kind}: duplicate values in {_show(values)}")
        else:
            if len(values) != 2:
                raise ValueError(f"{kind}: expected [lo, hi], got {_show(values)}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{kind}: lo and hi must be numbers, got {_show(values)}")
            lo, hi = values
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{kind}: lo and hi must be finite, got {_show(values)}")
            if kind == "randint" and not all(float(v).is_integer() for v in values):
                raise ValueError(f"randint: lo and hi must be integers, got {_show(values)}")
            if kind == "randint" and lo > hi:
                raise ValueError(f"randint: lo {lo} > hi {hi}: give [lo, hi] with lo <= hi")
            if kind != "randint" and lo >= hi:
                raise ValueError(f"{kind}: lo {lo} >= hi {hi}: give [lo, hi] with lo < hi "
                                 "(for one value use grid: [v])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: lo {lo} must be > 0 (log scale)")
        return data

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        return list(getattr(self, self.kind))

    @property
    def categorical(self) -> bool:
        return self.kind in CATEGORICAL

    def corners(self) -> list[Any]:
        """The values validated before compute: every listed value, or a range's ends (and, for
        uniform, its midpoint, which catches a float range on an integer setting)."""
        v = self.values
        if self.kind in CATEGORICAL:
            return v
        if self.kind == "randint":
            return [int(v[0]), int(v[1])]
        if self.kind == "uniform":
            return [float(v[0]), float(v[1]), (float(v[0]) + float(v[1])) / 2]
        return [float(v[0]), float(v[1]), math.sqrt(float(v[0]) * float(v[1]))]

    def encoded(self) -> bool:
        """True when a categorical value is not a scalar (then Tune/Optuna see it as JSON text)."""
        return self.categorical and any(isinstance(x, (dict, list)) for x in self.values)


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["asha"] = "asha"
    grace: int = Field(1, ge=1, description="instances every trial completes before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, le=100)


class SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str = "local"
    overrides: dict[str, Any] | list[str] = Field(default_factory=dict)
    metric: str
    mode: Literal["max", "min"] = "max"
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, le=100_000)
    max_concurrent: int | None = Field(None, ge=1, le=10_000)
    early_stopping: EarlyStopping | None = None
    seed: int = 0
    space: dict[str, Dimension]

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        task, _, metric = v.partition(".")
        from persrep.evaluation.tasks import task_spec
        from persrep.registry import TASKS

        METRICS = {name: task_spec(name).metrics for name in TASKS.names()}  # noqa: N806
        if task not in METRICS:
            raise ValueError(f"unknown task {task!r}: write task.metric with task one of "
                             f"{', '.join(METRICS)} (e.g. retrieval.ndcg)")
        if metric not in METRICS[task]:
            raise ValueError(f"unknown {task} metric {metric!r}: choose one of {', '.join(METRICS[task])}")
        return v


# ---------------------------------------------------------------------------------------------
# errors
def _format(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing" and loc == "metric":
            msg = "missing: name the metric to optimise as task.metric, e.g. metric: retrieval.ndcg"
        elif err["type"] == "missing":
            msg = f"missing: {loc} is required"
        elif err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            msg = "unknown top-level key: allowed are " + ", ".join(SpaceFile.model_fields)
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = f"{msg} (got {_show(err.get('input'))})" if err["type"] in (
                "literal_error", "int_type", "int_parsing", "greater_than_equal", "less_than_equal",
                "dict_type", "string_type", "float_type", "int_from_float") else msg
        lines.append(f"sweep space {origin}: {loc or '<root>'}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def _fail(lines: list[str]) -> None:
    if lines:
        raise SweepError("\n".join(dict.fromkeys(lines)))


# ---------------------------------------------------------------------------------------------
# settings paths
def _get(tree: dict[str, Any], path: list[str]) -> tuple[bool, Any]:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def is_data_key(key: str) -> bool:
    return key.startswith(DATA_PREFIXES) or key in DATA_EXTRA


def _encode(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


# ---------------------------------------------------------------------------------------------
@dataclass
class SweepSpace:
    """A validated space: base settings, dimensions split into data and trial keys."""

    path: str
    text: str
    spec: SpaceFile
    base: Settings
    dims: dict[str, Dimension]
    data_keys: list[str] = field(default_factory=list)
    trial_keys: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def task(self) -> str:
        return self.spec.metric.split(".", 1)[0]

    @property
    def metric_name(self) -> str:
        return self.spec.metric.split(".", 1)[1]

    # -- settings ---------------------------------------------------------------------------
    def settings_for(self, values: dict[str, Any]) -> Settings:
        """The base settings with ``values`` (dotted key -> value) applied, validated."""
        tree = self.base.model_dump(mode="json")
        for key, value in values.items():
            path = key.split(".")
            _, current = _get(tree, path)
            if isinstance(current, list) and not isinstance(value, list):
                value = [value]  # one generator type / CFG / caption source per trial
            _set(tree, path, copy.deepcopy(value))
        try:
            return Settings.model_validate(tree)
        except ValidationError as exc:
            shown = ", ".join(f"{k}={_show(v)}" for k, v in values.items())
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"sweep space {self.path}: with {shown}: {loc or '<settings>'}: {msg}")
            raise SweepError("\n".join(dict.fromkeys(lines))) from None

    # -- expansion --------------------------------------------------------------------------
    def data_combinations(self) -> list[dict[str, Any]]:
        """Every combination of the data dimensions' values (one empty dict when there are none)."""
        keys = self.data_keys
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.dims[k].values for k in keys))]

    def trial_grid_size(self) -> int:
        """Grid points over the trial dimensions (grid dimensions only)."""
        return math.prod(len(self.dims[k].values) for k in self.trial_keys if self.dims[k].kind == "grid")

    def grid_size(self) -> int:
        """Trials of a grid search before data deduplication: the product of every dimension's size."""
        return math.prod(len(d.values) for d in self.dims.values())

    def encode(self, key: str, value: Any) -> Any:
        return _encode(value) if self.dims[key].encoded() else value

    def decode(self, key: str, value: Any) -> Any:
        return json.loads(value) if self.dims[key].encoded() and isinstance(value, str) else value

    def trial_values(self, config: dict[str, Any]) -> dict[str, Any]:
        """A Tune trial config -> the trial keys' values (decoded)."""
        return {k: self.decode(k, config[k]) for k in self.trial_keys if k in config}


# ---------------------------------------------------------------------------------------------
def _read(path: str) -> tuple[dict[str, Any], str]:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep space {path}: not found (give a YAML file, e.g. tune_spaces/toy.yaml)")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep space {path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep space {path}: top level must be a mapping with config, metric and "
                         f"space (see tune_spaces/README.md), got {type(data).__name__}")
    return data, text


def _override_strings(overrides: dict[str, Any] | list[str]) -> list[str]:
    if isinstance(overrides, list):
        return list(overrides)
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def load_space(path: str, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpace:
    """Read, validate and expand a space file; ``overrides`` (``key.sub=value``) go on top of
    the file's own. Raises :class:`SweepError` (one line per problem) before any compute."""
    data, text = _read(path)
    if not data.get("space"):
        raise SweepError(f"sweep space {path}: space is empty: give at least one dimension "
                         f"under space:, e.g. {EXAMPLE_DIM}")
    try:
        spec = SpaceFile.model_validate(data)
    except ValidationError as exc:
        raise SweepError(_format(exc, path)) from None

    cli_keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    base_overrides = _override_strings(spec.overrides) + list(overrides)
    try:
        base = load_settings(spec.config, base_overrides)
    except ConfigError as exc:
        raise SweepError("\n".join(f"sweep space {path}: base settings: {ln}"
                                   for ln in str(exc).splitlines())) from None
    from persrep.pipeline.paths import resolve_settings_paths

    base = resolve_settings_paths(base)  # on the driver: trials run in Tune's trial directories

    tree = base.model_dump(mode="json")
    lines: list[str] = []
    data_keys: list[str] = []
    trial_keys: list[str] = []
    for key, dim in spec.space.items():
        where = f"sweep space {path}: space.{key}"
        parts = key.split(".")
        found, current = _get(tree, parts)
        if not found or any(not p for p in parts):
            lines.append(f"{where}: unknown settings key (check spelling; `persrep config show` "
                         "lists every key)")
            continue
        if parts[0] in NOT_SWEEPABLE:
            lines.append(f"{where}: {parts[0]}.* is not sweepable (it is the same for every trial): "
                         "set it in overrides: or on the command line")
            continue
        if isinstance(current, dict):
            sub = next(iter(current), "key")
            lines.append(f"{where}: is a section, not a value: sweep one of its keys (e.g. {key}.{sub})")
            continue
        if key in cli_keys or (isinstance(spec.overrides, dict) and key in spec.overrides):
            lines.append(f"{where}: also set in overrides: a swept key takes its value from the space; "
                         "remove the override")
            continue
        if is_data_key(key):
            if not dim.categorical:
                lines.append(f"{where}: data key with {dim.kind}: data keys change the generated data, "
                             "which is made before the trials for every value: use grid: or choice:")
                continue
            data_keys.append(key)
        elif key.startswith(TRIAL_PREFIXES):
            trial_keys.append(key)
        else:  # pragma: no cover - every section is covered above
            lines.append(f"{where}: not sweepable")
            continue
        is_int = isinstance(current, int) and not isinstance(current, bool)
        if is_int and dim.kind in ("uniform", "loguniform"):
            lines.append(f"{where}: {key} is an integer setting: use randint: [lo, hi] or grid: "
                         f"instead of {dim.kind}")
        if spec.search == "grid" and dim.kind != "grid":
            lines.append(f"{where}: search: grid needs every dimension as grid: [...] ({key} is "
                         f"{dim.kind}): list the values, or use search: random or optuna")
    if spec.search == "grid" and spec.num_samples != 1:
        lines.append(f"sweep space {path}: num_samples: search: grid runs each grid point once "
                     f"(num_samples={spec.num_samples} would repeat identical trials): remove it, "
                     "or use search: random / optuna")
    if spec.search == "optuna" and importlib.util.find_spec("optuna") is None:
        lines.append(f"sweep space {path}: search: optuna needs the optuna package: "
                     f"pip install '{OPTUNA_REQUIREMENT}' (or use search: grid / random)")
    _fail(lines)

    space = SweepSpace(path, text, spec, base, dict(spec.space), data_keys, trial_keys)
    combos = space.data_combinations()
    if len(combos) > MAX_DATA_COMBINATIONS:
        raise SweepError(f"sweep space {path}: {len(combos)} combinations of data keys "
                         f"({', '.join(data_keys)}): at most {MAX_DATA_COMBINATIONS}; narrow the space")
    _validate_corners(space, combos)
    return space


def _check_trial_settings(space: SweepSpace, s: Settings, values: dict[str, Any]) -> dict[str, str]:
    """What a single trial needs: one data configuration, one backbone, the metric's task.
    Returns {problem kind: line} (the caller reports each kind once)."""
    from persrep.generation.plan import data_configs

    where = f"sweep space {space.path}"
    shown = ", ".join(f"{k}={_show(v)}" for k, v in values.items()) or "the base settings"
    out: dict[str, str] = {}
    configs = data_configs(s)
    if len(configs) != 1:
        labels = ", ".join(c.label for c in configs)
        out["configs"] = (f"{where}: with {shown}: a trial trains one data configuration, these settings "
                          f"give {len(configs)} ({labels}): sweep generator.types (and synthesis.cfg / "
                          "synthesis.caption_sources) in space:, or fix them in overrides:")
    if len(s.personalization.backbones) != 1:
        names = ", ".join(b.name for b in s.personalization.backbones)
        out["backbones"] = (f"{where}: with {shown}: a trial personalises one backbone, these settings "
                            f"give {len(s.personalization.backbones)} ({names}): set "
                            "personalization.backbones to one in overrides:, or sweep it")
    if space.task not in s.evaluation.tasks:
        out["task"] = (f"{where}: metric {space.spec.metric}: task {space.task} is not in "
                       f"evaluation.tasks={list(s.evaluation.tasks)} (with {shown}): add it, or choose "
                       "another metric")
    return out


def _validate_corners(space: SweepSpace, combos: list[dict[str, Any]]) -> None:
    """Build the settings of every data combination and every trial dimension's corners."""
    lines: list[str] = []
    problems: dict[str, str] = {}  # the first line of each kind of trial-shape problem
    first_trial = {k: space.dims[k].corners()[0] for k in space.trial_keys}
    points = [(combo, {**combo, **first_trial}) for combo in combos]
    points += [({key: corner}, {**combos[0], **first_trial, key: corner})
               for key in space.trial_keys for corner in space.dims[key].corners()]
    for shown, values in points:
        try:
            s = space.settings_for(values)
        except SweepError as exc:
            lines += str(exc).splitlines()
            continue
        for kind, line in _check_trial_settings(space, s, shown).items():
            problems.setdefault(kind, line)
    _fail(lines + list(problems.values()))
