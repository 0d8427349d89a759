"""Deterministic failures are rejected, not retried (issue #29).

One policy (persrep/pipeline/retry.py) decides, for every executor, whether a unit that raised is
tried again. Here: its decisions on real exceptions (a real PyTorch shape error, the contrastive
sampler's TripletError, storage errors), then, on the FAST toy run, one deterministic failure
injected per stage that runs in it (synthesis, personalisation, evaluation; the other stages'
units go through the same ``LocalExecutor.map``): each is attempted once and reported in one line while
``resources.max_retries=2``, and a transient failure in the same place is still retried.
The Ray executors (Ray tasks, Tune trials, the Ray Data synthesis stage) are covered in
test_tune_stage.py and test_ray_synthesis.py with the same policy.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.pipeline.executor import LocalExecutor
from persrep.pipeline.retry import POLICY
from persrep.storage import MANIFEST, CorruptUnitError, StorageError, StorageUnavailableError

sys.path.insert(0, str(Path(__file__).parent))
from helpers import fast_reference  # noqa: E402
from worlds import FAST  # noqa: E402


def _shape_error() -> RuntimeError:
    import torch

    try:
        torch.zeros(2, 3) @ torch.zeros(4, 5)
    except RuntimeError as exc:
        return exc
    raise AssertionError("no shape error")


def _no_positives() -> Exception:
    from persrep.contrastive.triplets import TripletError

    return TripletError("no positives")


def test_policy_rejects_what_the_same_inputs_raise_again():
    from persrep.pipeline.units import UnitRejected

    rejected = [_no_positives(), ValueError("cut_paste mug_0: train mask 2 is empty"), _shape_error(),
                KeyError("positives_key"), IndexError("list index out of range"), TypeError("bad type"),
                UnitRejected("filter kept 0 of 4"), CorruptUnitError("checksum mismatch"),
                ZeroDivisionError("division by zero")]
    retried = [RuntimeError("simulated worker failure"), RuntimeError("CUDA out of memory. Tried to allocate"),
               OSError("connection reset"), StorageUnavailableError("s3 endpoint down"),
               StorageError("cannot read s3://b/x"), MemoryError(), TimeoutError("timed out")]
    assert [POLICY.retryable(e) for e in rejected] == [False] * len(rejected)
    assert [POLICY.retryable(e) for e in retried] == [True] * len(retried)
    line = POLICY.line(_shape_error())
    assert line.startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied") and "not retried" in line
    assert "\n" not in line


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fast_reference(tmp_path_factory)


# stage -> (storage area of its units, module and name of the unit function the runner calls, error)
STAGES = {
    "synthesis": ("synthesis", "persrep.pipeline.stages.synthesis", "run_synthesis_unit",
                  lambda: ValueError("cut_paste mug_0: train mask 2 is empty")),
    "personalization": ("adapters", "persrep.pipeline.stages.personalization", "run_personalize_unit",
                        _no_positives),
    "evaluation": ("evaluations", "persrep.pipeline.stages.evaluation", "run_evaluation_unit", _shape_error),
}


class Raising:
    """A stage's unit function that raises ``make()`` every time it is called for the unit ``key``
    (the real function for the others)."""

    def __init__(self, real, key: str, make):
        self.real, self.key, self.make, self.calls = real, key, make, 0

    def __call__(self, ctx, unit):
        if unit.key != self.key:
            return self.real(ctx, unit)
        self.calls += 1
        raise self.make()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_deterministic_failure_is_attempted_once_and_reported_in_one_line(stage, reference, tmp_path,
                                                                          monkeypatch):
    import importlib

    area, module, name, make = STAGES[stage]
    root = tmp_path / "root"
    shutil.copytree(reference["root"], root)
    victim = sorted(u for u in reference["units"] if u.startswith(f"{area}/"))[0]
    (root / victim / MANIFEST).unlink()  # unpublished: this unit alone is computed again
    mod = importlib.import_module(module)
    hook = Raising(getattr(mod, name), victim.split("/")[1], make)
    monkeypatch.setattr(mod, name, hook)
    said: list[str] = []
    settings = load_settings("local", [*FAST, f"storage.root={root}", "resources.max_retries=2"])
    summary = run_pipeline(settings, said.append, LocalExecutor(2, said.append), run_id="rejected")
    assert hook.calls == 1, said
    assert summary.exit_code == 1 and len(summary.failures) == 1, summary.failures
    failure = summary.failures[0]
    assert failure["stage"] == stage and failure["attempts"] == 1
    assert "\n" not in failure["error"] and str(make()).strip("'") in failure["error"]
    assert summary.retries == [] and not any(line.startswith("RETRIED") for line in said)
    assert [line for line in said if line.startswith("FAILED")] == [
        f"FAILED {stage} {failure['unit']} after 1 attempt(s): {failure['error']}"]


def test_a_transient_failure_in_the_same_place_is_still_retried(reference, tmp_path, monkeypatch):
    import persrep.pipeline.stages.personalization as runner

    root = tmp_path / "root"
    shutil.copytree(reference["root"], root)
    victim = sorted(u for u in reference["units"] if u.startswith("adapters/"))[0]
    (root / victim / MANIFEST).unlink()
    hook = Raising(runner.run_personalize_unit, victim.split("/")[1], lambda: RuntimeError("simulated worker failure"))
    monkeypatch.setattr(runner, "run_personalize_unit", hook)
    settings = load_settings("local", [*FAST, f"storage.root={root}"])
    summary = run_pipeline(settings, executor=LocalExecutor(2), run_id="transient")
    assert hook.calls == 3 and summary.failures[0]["attempts"] == 3
    assert summary.failures[0]["error"] == "RuntimeError: simulated worker failure"


def test_summary_leaves_out_a_backbone_without_adapters_and_says_why(reference, tmp_path, monkeypatch):
    """Every adapter of the run's backbone rejected: no ``nan / +nan / 0/n`` rows, one line why."""
    import persrep.pipeline.stages.personalization as runner

    root = tmp_path / "root"
    shutil.copytree(reference["root"], root)
    for man in (root / "adapters").glob(f"*/{MANIFEST}"):
        man.unlink()
    calls: list[str] = []

    def no_positives(ctx, unit):
        calls.append(unit.key)
        raise _no_positives()

    monkeypatch.setattr(runner, "run_personalize_unit", no_positives)
    summary = run_pipeline(load_settings("local", [*FAST, f"storage.root={root}"]),
                           executor=LocalExecutor(2), run_id="no-adapters")
    n = reference["stages"]["personalization"]["done"]
    assert len(calls) == n and summary.stages["personalization"]["failed"] == n  # once each
    assert "nan" not in summary.table
    assert summary.table.splitlines() == [
        "no personalised results",
        f"no adapter results for backbone(s) tf_efficientnet_lite0 ({n} personalisation unit(s) failed, "
        "first: TripletError: no positives (not retried: the same inputs raise it again))"]
    assert (root / "runs" / "no-adapters" / "summary.md").read_text() == summary.table
