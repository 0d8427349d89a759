"""A finished run -> what ``persrep find`` searches for.

A finished run is ``<root>/runs/<run_id>/`` with ``results.parquet``, ``summary.json`` and
``settings.yaml``; its adapters live at ``<root>/adapters/<key>/``. For every instance the run
personalised, the adapter of the *best data configuration* is chosen from the run's own results:
the highest classification AP (scene ``all``) of that instance, unless a data configuration is
named (``data_config=``), which is the honest choice when the same evaluation pool is later used
to measure the find job (``bench/find.py`` does that). ``--adapter DIR`` picks one adapter: the
run that evaluated it is found under the same root.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from persrep.config import BackboneSettings, Settings, content_key, load_settings
from persrep.data.layout import InstanceDataset, open_dataset
from persrep.storage import Storage, StorageError

__all__ = ["FindError", "Target", "FindSource", "resolve_run", "resolve_adapter"]


class FindError(ValueError):
    """Bad input to ``persrep find``: one line naming the file or option and the fix."""


@dataclass(frozen=True)
class Target:
    """One instance to find, with the adapter chosen for it (None: the pretrained backbone)."""

    instance: str
    category: str
    adapter_key: str | None
    data_config: str
    run_ap: float  # the run's classification AP of this choice (nan for pretrained)


@dataclass
class FindSource:
    """Everything a find job needs from a finished run; small and picklable."""

    run_uri: str
    run_id: str
    root: str  # the run's storage root (adapters, embedding cache by default)
    s3_endpoint: str | None
    settings: Settings
    data_path: str
    backbone: BackboneSettings
    global_feature: str
    targets: list[Target]
    notes: list[str] = field(default_factory=list)
    _ds: InstanceDataset | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"] = None
        return state

    @property
    def dataset(self) -> InstanceDataset:
        if self._ds is None:
            self._ds = open_dataset(self.data_path, self.s3_endpoint)
        return self._ds

    @property
    def storage(self) -> Storage:
        return Storage(self.root, self.s3_endpoint)

    @property
    def names(self) -> list[str]:
        return [t.instance for t in self.targets]

    def key(self) -> str:
        """Names the models of this find (backbone, feature, adapters): part of output keys."""
        return content_key("find-source", self.backbone, self.global_feature,
                           [(t.instance, t.adapter_key) for t in self.targets])


def _read(st: Storage, name: str, run_uri: str) -> bytes:
    try:
        return st.read_bytes(name)
    except StorageError:
        raise FindError(f"{run_uri}: no {name}: not a finished run (give --run <root>/runs/<run_id> "
                        "of a run that completed, e.g. after `make demo`)") from None


def _split_run_uri(run: str) -> tuple[str, str]:
    run = run.rstrip("/")
    parent, _, run_id = run.rpartition("/")
    root, _, runs = parent.rpartition("/")
    if runs != "runs" or not root or not run_id:
        raise FindError(f"--run {run}: expected <storage root>/runs/<run_id> (e.g. runs/local/runs/<id>)")
    return root, run_id


def _choose(results: pd.DataFrame, backbone: str, instances: list[str] | None,
            data_config: str | None, pretrained: bool, run_uri: str) -> list[Target]:
    rows = results[(results["task"] == "classification") & (results["metric"] == "ap")
                   & (results["scene"] == "all") & (results["backbone"] == backbone)]
    if "status" in rows:
        rows = rows[rows["status"].fillna("ok") == "ok"]
    personal = rows[rows["model"] == "personalised"]
    available = sorted(set(personal["instance"]))
    wanted = instances or available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise FindError(f"--instances: {unknown} not personalised in {run_uri} (it has: {available})")
    if not wanted:
        raise FindError(f"{run_uri}/results.parquet: no personalised instance with a classification "
                        f"result for backbone {backbone}: nothing to find")
    categories = dict(zip(results["instance"], results["category"]))
    targets = []
    for name in wanted:
        own = personal[personal["instance"] == name]
        if data_config is not None:
            own = own[own["data_config"] == data_config]
            if own.empty:
                configs = sorted(set(personal["data_config"]))
                raise FindError(f"--data-config {data_config}: instance {name} has no adapter for it "
                                f"in {run_uri} (configurations: {configs})")
        best = own.sort_values("value", ascending=False, kind="stable").iloc[0]
        if pretrained:
            targets.append(Target(name, str(categories[name]), None, "-", float("nan")))
        else:
            targets.append(Target(name, str(categories[name]), str(best["adapter_key"]),
                                  str(best["data_config"]), float(best["value"])))
    return targets


def resolve_run(run: str, *, instances: list[str] | None = None, data_config: str | None = None,
                backbone: str | None = None, pretrained: bool = False,
                s3_endpoint: str | None = None) -> FindSource:
    """Open a finished run and choose one adapter per instance (see the module docstring)."""
    root, run_id = _split_run_uri(run)
    try:
        st = Storage(run.rstrip("/"), s3_endpoint)
    except ValueError as exc:
        raise FindError(f"--run {run}: {exc}") from None
    results = pd.read_parquet(io.BytesIO(_read(st, "results.parquet", run)))
    summary = json.loads(_read(st, "summary.json", run))
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".yaml") as f:
        f.write(_read(st, "settings.yaml", run))
        f.flush()
        settings = load_settings(f.name)
    names = [b.name for b in settings.personalization.backbones]
    chosen = backbone or names[0]
    if chosen not in names:
        raise FindError(f"--backbone {chosen}: the run used {names}")
    bs = next(b for b in settings.personalization.backbones if b.name == chosen)
    data_path = summary.get("data") or ""
    if not data_path:
        raise FindError(f"{run}/summary.json: no 'data' entry: the run's reference photos are unknown")
    targets = _choose(results, chosen, instances, data_config, pretrained, run)
    src = FindSource(run.rstrip("/"), run_id, root, s3_endpoint or settings.storage.s3_endpoint,
                     settings, data_path, bs, settings.evaluation.global_feature, targets)
    try:
        ds = src.dataset
    except Exception as exc:  # noqa: BLE001 - one line naming the data set
        raise FindError(f"{run}: cannot open the run's data set {data_path}: "
                        f"{str(exc).splitlines()[0]}") from None
    missing = [t.instance for t in targets if t.instance not in ds.instances]
    if missing:
        raise FindError(f"{run}: instances {missing} are not in the run's data set {data_path}")
    return src


def resolve_adapter(adapter_dir: str, *, s3_endpoint: str | None = None) -> FindSource:
    """``<root>/adapters/<key>`` -> the run under ``<root>/runs/`` that evaluated it."""
    d = adapter_dir.rstrip("/")
    parent, _, key = d.rpartition("/")
    root, _, stage = parent.rpartition("/")
    if stage != "adapters" or not key:
        raise FindError(f"--adapter {adapter_dir}: expected <storage root>/adapters/<key>")
    st = Storage(root, s3_endpoint)
    if not st.is_finished("adapters", key):
        raise FindError(f"--adapter {adapter_dir}: not a finished adapter (no MANIFEST.json)")
    for run_id in reversed(st.list_dir("runs")):
        if not st.exists(f"runs/{run_id}/results.parquet"):
            continue
        frame = pd.read_parquet(io.BytesIO(st.read_bytes(f"runs/{run_id}/results.parquet")),
                                columns=["instance", "adapter_key", "data_config", "backbone"])
        hit = frame[frame["adapter_key"] == key]
        if not hit.empty:
            row = hit.iloc[0]
            return resolve_run(f"{root}/runs/{run_id}", instances=[str(row["instance"])],
                               data_config=str(row["data_config"]), backbone=str(row["backbone"]),
                               s3_endpoint=s3_endpoint)
    raise FindError(f"--adapter {adapter_dir}: no finished run under {root}/runs evaluated it; "
                    "give --run <root>/runs/<run_id> instead")
