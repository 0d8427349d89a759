"""Everything a run needs before compute: storage, the data set, instances, model sources.

``prepare_run`` fails in seconds, not after an hour: settings are already validated; here the
storage root is probed, the data set is materialised (toy world, PODS parquet) and checked, the
backbones' and the diffusion model's weights are located. The resulting :class:`RunContext` is
small, picklable and frozen once built: executors ship it to workers, which reopen the data set
from its path; what a unit reserves is the run's resource plan
(``persrep.pipeline.resource_plan``), not part of the context.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persrep.config import Settings, content_key
from persrep.data.check import check_dataset
from persrep.generation.base import any_generator, generator_caps, uses_base_model
from persrep.data.layout import (DatasetError, InstanceDataset, is_image_name, open_dataset, resolve_data_path,
                                 select_instances)
from persrep.storage import Storage, StorageError

Progress = Callable[[str], None]
DEEP_CHECK_LIMIT = 5000  # decode every image below this many; headers only above (PODS: 12k)


@dataclass(frozen=True)
class RunContext:
    settings: Settings
    storage: Storage
    data_path: str
    instances: dict[str, str]  # evaluated/personalised instance -> category
    dataset_key: str
    run_id: str
    notes: list[str] = field(default_factory=list)
    _ds: InstanceDataset | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"] = None  # workers reopen it (cheap listing) instead of pickling a cache
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # frozen: no __setattr__ while unpickling

    @property
    def dataset(self) -> InstanceDataset:
        if self._ds is None:  # a cache of the listing, not state: set once, on first use
            object.__setattr__(self, "_ds", open_dataset(self.data_path, self.settings.storage.s3_endpoint))
        return self._ds

    def resolve_data_path(self, value: str) -> str:
        """``@data/x`` -> ``<data set root>/x``; relative local paths made absolute for workers."""
        return resolve_data_path(value, self.data_path, absolute=True)

    def shared_images(self, kind: str, category: str) -> list[Any] | None:
        """The category's published shared images of ``kind`` (``persrep.pipeline.shared_images``),
        or None when this run has no such unit: what generator factories read (``generator_for``)."""
        from persrep.pipeline.shared_images import shared_unit
        from persrep.pipeline.stages.base_images import read_shared_images

        unit = shared_unit(kind, self.settings, category)
        return None if unit is None else read_shared_images(self.storage, unit.key)


def _toy_dataset(settings: Settings, storage: Storage, progress: Progress | None) -> str:
    from persrep.data.toy import write_toy_from_settings

    from persrep.data.toy import VERSION

    key = content_key("toy", settings.data.toy, VERSION)  # a new toy version: a new folder
    if storage.is_s3:
        # build locally, then upload; the unit's manifest makes the upload atomic for readers
        local = Path.home() / ".cache" / "persrep" / f"toy-{key}"
        write_toy_from_settings(local, settings.data.toy, progress=progress)
        stage = "datasets"
        if not storage.is_finished(stage, f"toy-{key}"):
            with storage.unit_writer(stage, f"toy-{key}", {"kind": "toy"}) as w:
                for f in sorted(local.rglob("*")):
                    if f.is_file():
                        w.write(str(f.relative_to(local)), f.read_bytes())
        return storage.uri(stage, f"toy-{key}")
    dest = Path(storage.path("datasets", f"toy-{key}"))
    write_toy_from_settings(dest, settings.data.toy, progress=progress)
    return str(dest)


def materialise_data(settings: Settings, storage: Storage, progress: Progress | None = None) -> str:
    """The data set's path in the reference layout (generating or converting it if needed)."""
    path = settings.data.path
    if path == "toy":
        return _toy_dataset(settings, storage, progress)
    fix = "give a directory in the reference layout, a PODS parquet export, an s3:// URI, or 'toy'"
    if not path.strip():
        raise DatasetError(f"data.path is empty: {fix}")
    if "://" in path and not path.startswith(("s3://", "file://")):
        raise DatasetError(f"data.path {path}: unsupported scheme {path.split('://', 1)[0]!r}: {fix}")
    if "://" not in path:
        from persrep.data.pods import is_pods_export, materialize_pods

        local = Path(path).expanduser().absolute()
        if not local.exists():
            raise DatasetError(f"data.path {path}: not found ({fix})")
        if is_pods_export(local):
            if storage.is_s3:
                raise DatasetError("data.path is a PODS parquet export but storage.root is s3://: "
                                   "run `persrep data pods SRC DEST` once and point data.path at DEST")
            dest = Path(storage.path("datasets", f"pods-{content_key(str(local))}"))
            return str(materialize_pods(local, dest, progress=progress))
        return str(local)
    return path


def preflight_models(settings: Settings) -> list[str]:
    """Locate every model's weights now (one clear line each when missing). Returns notes."""
    from persrep.models.backbones import backbone_identity, require_weights

    notes = []
    for bs in settings.personalization.backbones:
        ident = backbone_identity(bs)  # raises WeightsUnavailableError with the fix
        require_weights(bs)  # hub weights neither cached nor downloadable: the same, now
        notes.append(f"backbone {bs.name}: weights {ident.get('weights_source')}")
    # a type that draws from the base model (its own say: DreamBooth, generated backgrounds), or generated negatives
    diffusion_needed = uses_base_model(settings) or settings.personalization.negatives == "generated"
    if diffusion_needed:
        from persrep.models.diffusion import component_identity, require_available
        from persrep.pipeline.inputs import check_model_source

        check_model_source(settings.generator.base_model, "generator.base_model")
        component_identity(settings.generator.base_model)
        require_available(settings.generator.base_model)  # raises ModelUnavailableError
        notes.append(f"diffusion base model: {settings.generator.base_model}")
    from persrep.generation.filtering import require_scorer

    require_scorer(settings.synthesis.filter)  # dreamsim: package and weights, before compute
    notes += cpu_fallback_notes(settings)  # GPU-only settings on CPU: one warning each
    return notes


def cpu_fallback_notes(settings: Settings, cuda: bool | None = None) -> list[str]:
    """GPU-only settings on a machine without CUDA: one warning each, from each configured generator
    type's own section (its ``device_notes``; DreamBooth's: persrep.models.accelerator)."""
    from persrep.generation.base import device_notes

    return device_notes(settings, cuda)  # each configured type's own section


def run_needs_categories(settings: Settings) -> bool:
    """Whether a run's settings use the category of each instance (prompts, classes, negatives):
    a type that trains per instance, captions other than the template for a type that uses
    captions, or generated negatives (the data check then requires every instance's category)."""
    trained = any_generator(settings.generator.types, lambda c: c.trains_per_instance)
    captioned = any_generator(settings.generator.types, lambda c: c.uses_captions)
    captions = captioned and any(s != "template" for s in settings.synthesis.caption_sources)
    return trained or captions or settings.personalization.negatives == "generated"


def prepare_run(settings: Settings, progress: Progress | None = None, run_id: str | None = None) -> RunContext:
    say = progress or (lambda _m: None)
    from persrep.pipeline.paths import resolve_settings_paths

    settings = resolve_settings_paths(settings)  # once, on the driver: workers get absolute paths
    from persrep.pipeline.path_guard import check_path_overlaps

    check_path_overlaps(settings)  # no input inside the run's output, no storage root inside the data
    from persrep.pipeline.inputs import check_settings_inputs

    check_settings_inputs(settings)  # counts that fail every unit, captions file and model: no data needed
    storage = Storage.from_settings(settings.storage)
    storage.check_writable()
    notes = [*settings.notes, *preflight_models(settings)]  # old spellings read (config.migrate_settings)
    t0 = time.perf_counter()
    data_path = materialise_data(settings, storage, progress)
    ds = open_dataset(data_path, settings.storage.s3_endpoint)
    n_images = sum(len(v) for i in ds.instances.values() for v in i.images.values())
    from persrep.evaluation.tasks import dense_tasks

    dense = bool(dense_tasks(settings.evaluation.tasks))
    report = check_dataset(ds, deep=n_images <= DEEP_CHECK_LIMIT, dense_tasks=dense,
                           needs_categories=run_needs_categories(settings))
    report.raise_on_errors()
    for f in report.of("warning")[:10]:
        notes.append(f"data warning: {f.line()}")
    notes += [f"data: {f.line()}" for f in report.of("note") if "masks predicted by" in f.problem]
    names = select_instances(ds, settings.data.instances, settings.data.split, settings.data.max_instances)
    needs_masks = [t for t in settings.generator.types if generator_caps(t).needs_masks]
    masks_missing = not ds.has_masks("train") and not settings.generator.auto_masks
    if needs_masks and masks_missing:
        raise DatasetError(f"generator types {needs_masks} need train masks, but {data_path} has none: "
                           f"predict them with `persrep data masks {data_path}` (or set "
                           "generator.auto_masks=true), add train_masks/ (`persrep data import --masks`), "
                           "or use generator.types=[real_only, dreambooth]")
    if settings.personalization.hard_negatives.context and masks_missing:
        raise DatasetError(f"personalization.hard_negatives.context={settings.personalization.hard_negatives.context} "
                           f"crops the train photos beside their objects, but {data_path} has no train "
                           "masks: set generator.auto_masks=true (or `persrep data masks`), add "
                           "train_masks/, or set personalization.hard_negatives.context=0")
    from persrep.segmentation.preflight import preflight_segmenters

    notes += preflight_segmenters(settings)
    say(f"data: {data_path} ({len(ds.instances)} instances, {n_images} images, "
        f"{len(names)} selected; checked in {time.perf_counter() - t0:.1f} s)")
    if settings.personalization.negatives == "in_pool":  # the last note (the context is frozen once built)
        notes.append("WARNING: personalization.negatives=in_pool draws negatives from evaluated "
                     "instances; classification gains are inflated by leakage (docs/PROTOCOL.md)")
    ctx = RunContext(settings, storage, data_path, {n: ds.instances[n].category for n in names},
                     ds.listing_key, run_id or time.strftime("%Y%m%d-%H%M%S"), notes, _ds=ds)
    check_external_negatives(ctx)
    from persrep.pipeline.inputs import check_run_inputs

    check_run_inputs(settings, ctx.instances, ctx.resolve_data_path)  # captions, backgrounds, counts
    return ctx


def check_external_negatives(ctx: RunContext) -> None:
    """``personalization.negatives=external`` needs a folder with images: say so before compute
    (otherwise every personalisation unit would fail on its own, after the generators trained)."""
    pz = ctx.settings.personalization
    if pz.negatives != "external":
        return
    where = pz.external_negatives or ""
    fix = ("point it at a folder of photos of objects that are not evaluated (e.g. `@data/negatives` "
           "of the toy world), or use personalization.negatives=generated")
    try:
        resolved = ctx.resolve_data_path(where)
        files = Storage(resolved, ctx.settings.storage.s3_endpoint).list_files()
    except (StorageError, ValueError) as exc:
        raise DatasetError(f"personalization.external_negatives={where}: {str(exc)[:240]} ({fix})") from None
    if not any(is_image_name(f.rsplit("/", 1)[-1]) for f, _ in files):
        raise DatasetError(f"personalization.external_negatives={where}: no images in {resolved}: {fix}")
