"""A bounded, seeded soak: the tiny pipeline run round after round with faults injected.

Every round trains and evaluates a new set of adapters (``personalization.seed`` changes; the
synthesis units and the pretrained evaluation are shared by all rounds) on one storage root,
with faults chosen by a seeded RNG:

* a *runtime* fault while the round runs: a unit function that raises once before or after
  doing its work (the executor retries it), one that keeps raising until the job gives up on it
  (the re-run completes it), or the driver (``run_all.py --no-ray``, a subprocess) killed with
  its process group after a random number of units were published;
* then *storage* faults on units the round uses: a half-written unit (its manifest gone, a file
  truncated, as if the writer died before publishing), a byte flipped in a finished file, a
  finished file deleted, a torn manifest.

After each fault the job is simply run again; then a verification run must find every unit of
the round intact and compute nothing. A unit is lost when it was once published and is not
published, intact and byte-identical (payload files) at the end. The figures (faults injected,
survived, units lost) are printed and written to ``<tmp>/soak.json``. Runtime: ~2-3 min.

Faults are injected the way the other tests do: by wrapping the runner's unit functions
(test_pipeline.test_failed_unit_is_retried_then_reported) and by killing a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.pipeline.executor import LocalExecutor
from persrep.storage import MANIFEST

sys.path.insert(0, str(Path(__file__).parent))
from helpers import (RESULT_KEY, job_env, kill_job, run_all_argv, spawn, unit_manifests,  # noqa: E402
                     verify_all, wait_for)
from worlds import FAST  # noqa: E402

SEED = 20261125
ROUNDS = 6
RUNTIME_FAULTS = ["raise_before_once", "raise_after_once", "raise_until_given_up", "kill_driver"]
STORAGE_FAULTS = ["half_written", "flipped_byte", "deleted_file", "torn_manifest"]
HOOKED = {"synthesis": ("synthesis", "run_synthesis_unit"),
          "personalization": ("personalization", "run_personalize_unit"),
          "evaluation": ("evaluation", "run_evaluation_unit")}  # stage -> (its module in pipeline.stages, unit function)


def _digest(path: Path) -> str:
    """sha256 of a file's content; for safetensors, of its tensors and metadata (the writer
    orders the metadata keys differently in every process, so the bytes are not reproducible)."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _payload(root: Path, unit: str) -> dict[str, str]:
    """Digests of a unit's files, except its manifest and metrics.json (it records timings)."""
    return {p.name: _digest(p) for p in sorted((root / unit).iterdir())
            if p.is_file() and p.name not in (MANIFEST, "metrics.json")}


def _unit_key(unit) -> str:
    return unit.key


class RaisingHook:
    """Wraps one of the runner's unit functions: the ``nth`` call raises (before or after doing
    the work); with ``sticky`` every later call for the same unit raises too."""

    def __init__(self, real, nth: int, after: bool, sticky: bool):
        self.real, self.nth, self.after, self.sticky = real, nth, after, sticky
        self.calls, self.target, self.raised = 0, None, 0

    def __call__(self, ctx, unit):
        self.calls += 1
        if self.calls == self.nth:
            self.target = _unit_key(unit)
        hit = self.calls == self.nth or (self.sticky and self.target == _unit_key(unit))
        if hit and not self.after:
            self.raised += 1
            raise RuntimeError("soak: injected fault")
        value = self.real(ctx, unit)
        if hit:
            self.raised += 1
            raise RuntimeError("soak: injected fault after the work")
        return value


def _damage(root: Path, unit: str, kind: str, rng: random.Random) -> None:
    d = root / unit
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name != MANIFEST)
    victim = rng.choice(files)
    if kind == "half_written":
        (d / MANIFEST).unlink()
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif kind == "flipped_byte":
        data = bytearray(victim.read_bytes())
        i = rng.randrange(len(data))
        data[i] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif kind == "deleted_file":
        victim.unlink()
    elif kind == "torn_manifest":
        man = d / MANIFEST
        man.write_bytes(man.read_bytes()[: rng.randrange(1, man.stat().st_size // 2)])
    else:
        raise ValueError(kind)


def _results(root: Path, run_id: str) -> pd.DataFrame:
    frame = pd.read_parquet(root / "runs" / run_id / "results.parquet")
    return frame[[*RESULT_KEY, "value"]].sort_values(RESULT_KEY).reset_index(drop=True)


def test_soak_faults_injected_survived_and_no_unit_lost(tmp_path, monkeypatch):
    import importlib

    rng = random.Random(SEED)
    root = tmp_path / "root"
    schedule = rng.sample(RUNTIME_FAULTS, len(RUNTIME_FAULTS))
    schedule += [rng.choice(RUNTIME_FAULTS) for _ in range(ROUNDS - len(schedule))]
    injected, survived = Counter(), Counter()
    ledger: dict[str, dict[str, str]] = {}  # unit -> payload hashes when first seen published
    problems: list[str] = []
    log: list[str] = []
    t0 = time.monotonic()
    n_rows = None

    def run(settings, run_id, **kw):
        return run_pipeline(settings, log.append, LocalExecutor(kw.pop("retries", 1), log.append),
                            run_id=run_id)

    def remember() -> None:
        for unit in unit_manifests(root):
            ledger.setdefault(unit, _payload(root, unit))

    for r in range(ROUNDS):
        overrides = [*FAST, f"storage.root={root}", f"personalization.seed={1000 + r}"]
        settings = load_settings("local", overrides)
        before = set(unit_manifests(root))
        kind = schedule[r]
        injected[kind] += 1
        ok = True
        # -- 1. a runtime fault while the round runs, then re-runs until it completes ----------
        if kind == "kill_driver":
            new_units = 21 if r == 0 else 16  # round 0 also synthesises; later rounds: 8 + 8
            k = rng.randint(1, new_units - 4)  # >= 4 units left: a descheduled test still kills a running job
            proc = spawn(run_all_argv(root, f"r{r}-killed", *overrides),
                         tmp_path / "logs", f"r{r}", job_env())
            try:
                wait_for(lambda: len(set(unit_manifests(root)) - before) >= k, 240,
                         f"{k} new units", proc)
            finally:
                strays = kill_job(proc)
            ok &= proc.returncode == -signal.SIGKILL and not strays
            summary = run(settings, f"r{r}")
        else:
            stage = rng.choice(sorted(HOOKED)) if r == 0 else rng.choice(["personalization", "evaluation"])
            n_units = {"synthesis": 4, "personalization": 8, "evaluation": 9}[stage]
            module = importlib.import_module(f"persrep.pipeline.stages.{HOOKED[stage][0]}")
            hook = RaisingHook(getattr(module, HOOKED[stage][1]), rng.randint(1, n_units),
                               after=kind == "raise_after_once", sticky=kind == "raise_until_given_up")
            with monkeypatch.context() as m:
                m.setattr(module, HOOKED[stage][1], hook)
                summary = run(settings, f"r{r}-faulty", retries=rng.randint(0, 1) if hook.sticky else 1)
            ok &= hook.raised >= 1
            if hook.sticky:  # given up on: reported, then the re-run completes it
                ok &= summary.exit_code == 1 and len(summary.failures) == 1
                summary = run(settings, f"r{r}")
            else:  # retried within the run
                ok &= summary.exit_code == 0 and sum(c["retried"] for c in summary.stages.values()) == 1
        ok &= summary.exit_code == 0
        remember()
        used = sorted(u for u in unit_manifests(root)
                      if u not in before or u.startswith("synthesis/")
                      or json.loads((root / u / MANIFEST).read_text())["meta"].get("kind") == "pretrained")
        survived[kind] += ok
        if not ok:
            problems.append(f"round {r}: runtime fault {kind} not survived: {summary.failures}")

        # -- 2. storage faults on units this round uses, then one re-run ------------------------
        victims = rng.sample(used, rng.randint(2, 3))
        kinds = [rng.choice(STORAGE_FAULTS) for _ in victims]
        for unit, sk in zip(victims, kinds):
            _damage(root, unit, sk, rng)
            injected[sk] += 1
        again = run(settings, f"r{r}-repaired")
        done = sum(c["done"] for c in again.stages.values())
        for unit, sk in zip(victims, kinds):
            fine = (again.exit_code == 0 and (root / unit / MANIFEST).exists()
                    and _payload(root, unit) == ledger[unit])
            survived[sk] += fine
            if not fine:
                problems.append(f"round {r}: {sk} on {unit} not repaired ({again.failures})")
        if done != len(victims):
            problems.append(f"round {r}: {done} units recomputed for {len(victims)} damaged: {again.stages}")

        # -- 3. verification: nothing left to compute, results complete and identical ----------
        check = run(settings, f"r{r}-check")
        if any(c["done"] or c["failed"] for c in check.stages.values()):
            problems.append(f"round {r}: verification run still had work: {check.stages}")
        res = _results(root, f"r{r}-check")
        n_rows = n_rows or len(res)
        if len(res) != n_rows or res.duplicated(RESULT_KEY).any() or \
                not res.equals(_results(root, f"r{r}-repaired")):
            problems.append(f"round {r}: results incomplete, duplicated or changed")

    # -- nothing lost: every unit ever published is there, verifies and has its first payload ----
    lost = [u for u, payload in ledger.items()
            if not (root / u / MANIFEST).exists() or _payload(root, u) != payload]
    n_verified = verify_all(root)
    figures = {"seed": SEED, "rounds": ROUNDS, "faults_injected": sum(injected.values()),
               "faults_survived": sum(survived.values()), "units_lost": len(lost),
               "units_published": len(ledger), "units_verified_at_end": n_verified,
               "by_kind": {k: {"injected": injected[k], "survived": survived[k]} for k in injected},
               "seconds": round(time.monotonic() - t0, 1), "problems": problems}
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=1))
    print("\nSOAK " + json.dumps(figures))
    assert problems == [], "\n".join(problems)
    assert lost == [] and n_verified == len(ledger)
    assert figures["faults_survived"] == figures["faults_injected"] >= 3 * ROUNDS
    assert set(RUNTIME_FAULTS) <= set(injected)
