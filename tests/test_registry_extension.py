"""A fifth generator type, added the registry way: one class (with its own settings section and
memory estimate) + one registry call, here in the test, no other file edited, run through the whole
pipeline in-process (generator prep, synthesis, personalisation, evaluation). The planner,
pre-flight, memory plan and runner learn what it needs from its capabilities and class methods,
never from its name; its section is ``generator.<its name>`` in the settings as soon as it registers."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pydantic import Field

from persrep.config import ConfigError, Section, load_settings
from persrep.generation.base import (Capabilities, GeneratorArtifact, MemoryNeed, PersonalizedGenerator,
                                     SampledImage, generator_caps, instance_data_key, register_generator,
                                     unregister_generator)
from persrep.evaluation.records import Score
from persrep.evaluation.tasks import TaskSpec, register_task
from persrep.registry import GENERATORS, TASKS

NAME = "photo_jitter_test"
TASK = "own_nearest_test"
TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6",
        "synthesis.num_positives=4", "synthesis.resolution=32", "synthesis.cfg=[4, 5]",
        "personalization.max_steps=3", "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.dense_input_size=64",
        "tracking.enabled=false"]


class PhotoJitterSettings(Section):
    """Its own settings section, ``generator.photo_jitter_test``."""

    max_shift: float = Field(0.125, gt=0, le=0.5, description="largest shift, a fraction of the canvas")
    tint: float = Field(0.3, ge=0, le=1, description="weight of the mean colour at cfg 30")
    prep_gb: float = Field(0.25, ge=0, le=64, description="host memory one generator-prep unit needs")


class PhotoJitterGenerator(PersonalizedGenerator):
    """Trains per instance (its 'model' is the mean colour of the instance's photos) and draws each
    positive as one of the photos, shifted and tinted towards that colour by the row's seed and
    guidance scale. Positives are synthetic; it uses guidance (one data configuration per CFG)."""

    type_name = NAME
    needs_training = True
    capabilities = Capabilities(trains_per_instance=True, uses_guidance=True)
    settings_class = PhotoJitterSettings
    prepared: list[str] = []  # instances trained in this process (generator prep ran here)
    tints: set[float] = set()  # the section's tint as the generator saw it when sampling

    @classmethod
    def prep_memory(cls, section, sampler, on_gpu, diffusion_params):
        return MemoryNeed({"photos": section.prep_gb}, sized_by=f"generator.{NAME}.prep_gb")

    def settings_for_key(self):
        return {"version": 1, "jitter": self.section.model_dump(mode="json")}

    def prepare(self, instance, out_dir):
        mean = np.mean([np.asarray(im.convert("RGB"), dtype=np.float64).mean((0, 1))
                        for im in instance.train_images], 0)
        photos = []
        for im in instance.train_images:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            photos.append(buf.getvalue())
        files = {"model.json": json.dumps({"mean": mean.tolist()}).encode(),
                 **{f"photo_{i}.png": b for i, b in enumerate(photos)}}
        type(self).prepared.append(instance.name)
        return GeneratorArtifact(self.type_name, instance.name, files,
                                 {"settings": self.settings_for_key(), "inputs": instance_data_key(instance)},
                                 self.artifact_key(instance))

    def load(self, artifact):
        self.mean = np.asarray(json.loads(artifact.files["model.json"])["mean"])
        self.photos = [Image.open(io.BytesIO(artifact.files[f])).convert("RGB")
                       for f in sorted(artifact.files) if f.startswith("photo_")]

    def sample(self, rows):
        out = []
        size, shift = self.sampler.resolution, int(self.sampler.resolution * self.section.max_shift)
        type(self).tints.add(self.section.tint)
        for row in rows:
            rng = np.random.default_rng(row.seed)
            arr = np.asarray(self.photos[row.index % len(self.photos)].resize((size, size)), dtype=np.float64)
            arr = np.roll(arr, tuple(rng.integers(-shift, shift + 1, 2)), axis=(0, 1))
            weight = min(row.cfg / 30.0, 1.0) * self.section.tint
            arr = (1 - weight) * arr + weight * self.mean
            out.append(SampledImage(Image.fromarray(arr.clip(0, 255).astype(np.uint8)), None, row))
        return out


def own_nearest(x) -> list:
    """A fifth task: the fraction of the instance's test images whose nearest training image
    (cosine, over every instance's) is one of its own. An independent numpy computation."""
    test = np.asarray(x.pool.test_embeddings)[x.own_test]
    train = np.asarray(x.pool.train_embeddings)
    sims = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ \
        (train / np.linalg.norm(train, axis=1, keepdims=True)).T
    hits = np.asarray(x.pool.train_labels)[sims.argmax(1)] == x.instance
    return [Score(TASK, "top1", float(hits.mean()))]


@pytest.fixture
def fifth_task():
    """A new evaluation task, the same way: one spec + one registry call."""
    register_task(TaskSpec(TASK, dense=False, metrics=("top1",), headline="top1", evaluate=own_nearest))
    yield TASK
    TASKS.remove(TASK)


@pytest.fixture
def fifth_generator():
    """The one registry call (a decorator); removed afterwards (with its settings section) so other
    tests see four types."""
    assert NAME not in GENERATORS
    register_generator(PhotoJitterGenerator)
    PhotoJitterGenerator.prepared, PhotoJitterGenerator.tints = [], set()
    yield PhotoJitterGenerator
    unregister_generator(NAME)
    with pytest.raises(ConfigError, match=f"generator.{NAME} = .*unknown key"):
        load_settings("local", [f"generator.{NAME}.tint=0.5"])


def test_unknown_names_are_settings_errors_naming_the_choices():
    with pytest.raises(ConfigError, match=f"generator.types = .*unknown generator type '{NAME}': "
                                          r"choose one of \[.*dreambooth.*\] \(generator.types\)"):
        load_settings("local", [f"generator.types=[{NAME}]"])
    with pytest.raises(ConfigError, match=f"evaluation.tasks = .*unknown evaluation task '{TASK}'"):
        load_settings("local", [f"evaluation.tasks=[{TASK}]"])


@pytest.mark.slow
def test_a_fifth_generator_and_task_registered_here_run_through_the_whole_pipeline(tmp_path, fifth_generator,
                                                                                   fifth_task):
    from persrep.pipeline import run_pipeline

    root = tmp_path / "root"
    settings = load_settings("local", [*TINY, f"generator.types=[real_only, {NAME}]", f"storage.root={root}",
                                       f"evaluation.tasks=[classification, {TASK}]",
                                       f"generator.{NAME}.tint=0.5", f"generator.{NAME}.prep_gb=0.5"])
    assert settings.generator.photo_jitter_test.tint == 0.5  # its section is part of the schema
    with pytest.raises(ConfigError, match=f"generator.{NAME}.tint = 2.*less than or equal to 1"):
        load_settings("local", [f"generator.{NAME}.tint=2"])
    caps = generator_caps(NAME)
    assert caps.trains_per_instance and not caps.positives_are_real and not caps.needs_base_model
    said: list[str] = []
    summary = run_pipeline(settings, said.append, run_id="fifth")
    assert summary.exit_code == 0, summary.failures
    assert fifth_generator.tints == {0.5}  # its section's value reached the generator
    # its memory estimate reached the plan: 0.5 GB + the process's 1.2 GB per generator-prep unit
    plan = [m for m in said if m.startswith("plan generator_prep:")]
    assert len(plan) == 1 and "1.7 GiB (estimate: photos 0.5 + process 1.2)" in plan[0], said
    n = 4  # instances
    assert summary.stages["generator_prep"]["done"] == n            # it trains per instance
    assert sorted(fifth_generator.prepared) == ["bottle_0", "bottle_1", "mug_0", "mug_1"]
    assert "base_images" not in summary.stages                       # needs no base model images
    assert summary.stages["synthesis"]["done"] == 2 * n              # one unit per (cfg, instance)
    assert summary.stages["personalization"]["done"] == 3 * n        # real_only + its two CFGs
    assert summary.stages["evaluation"]["done"] == 3 * n + 1
    frame = pd.read_parquet(root / "runs" / "fifth" / "results.parquet")
    mine = frame[frame["generator"] == NAME]
    # one data configuration per CFG (it uses guidance), no caption source (it uses no captions)
    assert set(mine["data_config"]) == {f"{NAME}/cfg4/none", f"{NAME}/cfg5/none"}
    assert set(mine["positives_used"]) == {"synthetic"} and set(mine["n_positives"]) == {4}
    assert mine["value"].notna().all() and set(mine["task"]) == {"classification", TASK}
    # the new task scored every model on every instance, within [0, 1]
    top1 = frame[frame["task"] == TASK]
    assert set(top1["metric"]) == {"top1"} and len(top1) == 3 * n + n  # adapters + pretrained
    assert top1["value"].between(0, 1).all()
    # its synthesis units are labelled like every other's, and a re-run computes nothing
    units = json.loads((root / "runs" / "fifth" / "units.json").read_text())
    assert sum(u["stage"] == "synthesis" and u["label"].startswith("pos:") for u in units) == 2 * n
    again = run_pipeline(settings, run_id="again")
    assert all(c["done"] == 0 for c in again.stages.values()), again.stages
    assert len(fifth_generator.prepared) == n  # its generators were not trained again


def test_its_section_and_memory_estimate_enter_the_memory_plan(fifth_generator):
    from persrep.pipeline.memory import estimate_stage

    settings = load_settings("local", [f"generator.types=[{NAME}]", f"generator.{NAME}.prep_gb=3"])
    est = estimate_stage(settings, "generator_prep")
    assert est.parts == {"photos": 3.0, "process": 1.2} and est.sized_by == f"generator.{NAME}.prep_gb"
