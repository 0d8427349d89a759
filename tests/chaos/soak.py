"""A seeded chaos soak of the whole tiny job on a ``ray.cluster_utils.Cluster`` (issue #20).

Modelled on Ray's chaos release tests (a killer that SIGKILLs workers or raylets at random
intervals while a Data / Train / Tune workload runs, and requires the workload to finish):

1. **reference**: ``run_all --no-ray`` of the same settings on a local root, and one per swept
   configuration of the sweep (a sweep trial publishes ordinary keyed units, so the same keys);
2. **cluster**: a head (1 CPU) and one worker node (1 CPU), started by this process (never attached
   to anything else on the machine), storage on this process's own moto S3 server;
3. **chaos**: ``ray_jobs/run_all.py`` (all stages) then ``ray_jobs/sweep.py`` (two
   configurations) attached to that cluster, while a seeded killer (``--faults`` during the job,
   then ``--sweep-faults`` of its own during the sweep), at random moments, does one of
   * ``synthesis_actor``: SIGKILL a Ray Data synthesis actor (``SynthesisWorker``),
   * ``trial_worker``: SIGKILL a personalisation trial's worker (Tune's function trainable),
   * ``worker_node``: SIGKILL a whole worker node (raylet and every process of it), then add one,
   * ``driver``: SIGKILL the driver's process group; the soak starts the job again, as a user would,
   * ``s3_server``: stop the S3 server for a few seconds, then restart it on the same port.
   A job that exits non-zero (killed, or stopped by the S3 outage: "re-run to resume") is
   started again, up to ``--max-attempts`` times per phase.
4. **checks** (written to the JSON, asserted by tests/chaos/test_chaos.py): the same unit keys as
   the references, every manifest's checksums valid, no unit directory without its manifest,
   synthesis rows exactly once, results equal to the references within ``ATOL``, and no process
   of the cluster or of any driver left alive after shutdown (checked by PID).

Processes are found only through this cluster: the raylet PIDs of its nodes
(``node.all_processes``) and their descendants (``/proc``); never by name machine-wide.

    python tests/chaos/soak.py --seed 3 --out /tmp/soak.json [--faults 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from helpers import free_port, start_moto  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN_ALL = REPO / "ray_jobs" / "run_all.py"
SWEEP = REPO / "ray_jobs" / "sweep.py"
SPACE = Path(__file__).with_name("space.yaml")
KINDS = ("synthesis_actor", "trial_worker", "worker_node", "driver", "s3_server")
ATOL = 1e-6  # results vs the uninterrupted references: absolute, on metrics in [0, 1]
STAGES = ("generators", "synthesis", "adapters", "evaluations")
RESULT_KEY = ["instance", "task", "metric", "scene", "model", "data_config"]
# the tiny job: 2 categories x 2 instances at 64 px, real-only + cut-and-paste, checkpoints every
# 2 steps (a killed trial resumes from one); the sweep space (space.yaml) uses the same data
SETTINGS = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.max_instances=1",
            "data.toy.image_size=64",
            "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6",
            "generator.types=[real_only, cut_paste]", "synthesis.num_positives=4",
            "synthesis.resolution=32", "synthesis.batch_size=2",
            "personalization.max_steps=6", "personalization.batch_size=4",
            "personalization.checkpoint_every=2",
            "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
            "evaluation.tasks=[classification, retrieval]", "evaluation.dense_input_size=64",
            "tracking.enabled=false", "resources.gpus_per_trial=0", "resources.max_retries=3"]
SWEEP_RANKS = (2, 4)  # personalization.lora.rank in space.yaml


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


# -- processes, found through the cluster only ----------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, session id, state) of ``pid``, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[1]), int(fields[3]), fields[0]


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _proc_stat(int(d.name))
            if st is not None and st[2] != "Z":
                out.setdefault(st[0], []).append(int(d.name))
    return out


def descendants(roots: list[int]) -> list[int]:
    kids = _children_map()
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        for c in kids.get(pid, []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] != "Z"


class ChaosCluster:
    """A head and worker nodes of our own; every PID it ever had is remembered (orphan check)."""

    def __init__(self, temp_dir: str):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir})
        self.workers = [self.cluster.add_node(num_cpus=1)]
        self.cluster.wait_for_nodes()
        self.seen: set[int] = set()
        self.remember()

    @property
    def address(self) -> str:
        return self.cluster.address

    def _node_pids(self, node) -> list[int]:
        return [p.process.pid for procs in node.all_processes.values() for p in procs]

    def raylet_pid(self, node) -> int:
        return node.all_processes["raylet"][0].process.pid

    def pids(self) -> list[int]:
        roots = [pid for n in [self.cluster.head_node, *self.workers] for pid in self._node_pids(n)]
        out = roots + descendants(roots)
        self.seen.update(out)
        return out

    remember = pids

    def workers_matching(self, *needles: str) -> list[int]:
        return sorted(p for p in self.pids() if any(n in cmdline(p) for n in needles))

    def kill_worker_node(self, rng: random.Random) -> str:
        node = rng.choice(self.workers)
        self.pids()  # remember the node's workers before they go
        self.cluster.remove_node(node, allow_graceful=False)  # SIGKILL of every process of the node
        self.workers.remove(node)
        return node.node_id[:8]

    def add_worker_node(self) -> None:
        """Main thread only (Ray's Node sets a SIGTERM handler)."""
        self.workers.append(self.cluster.add_node(num_cpus=1))
        self.cluster.wait_for_nodes()
        self.remember()

    def shutdown(self) -> None:
        self.remember()
        self.cluster.shutdown()


class S3:
    """This soak's own moto server on a fixed port (restartable: moto's state lives in-process)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = start_moto(self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# -- the killer -------------------------------------------------------------------------------
class Killer(threading.Thread):
    """At seeded random moments, inject one fault of a kind whose target exists now; stage-bound
    kinds (an actor, a trial) are preferred when their target is up, so they are not missed."""

    STAGE_BOUND = {"synthesis_actor": ("SynthesisWorker",), "trial_worker": ("ImplicitFunc", "personalize_trial")}

    def __init__(self, rng: random.Random, cluster: ChaosCluster, s3: S3, kinds: list[str],
                 min_gap: float, max_gap: float, outage_s: float, t0: float | None = None):
        super().__init__(daemon=True)
        self.rng, self.cluster, self.s3 = rng, cluster, s3
        self.todo = list(kinds)
        self.min_gap, self.max_gap, self.outage_s = min_gap, max_gap, outage_s
        self.driver: subprocess.Popen | None = None
        self.driver_phase = ""
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.t0 = time.monotonic() if t0 is None else t0
        self.main_thread_todo: list = []  # callables the main thread runs (adding a node back)
        self.main_thread_done = threading.Event()

    def run_main_thread_actions(self) -> None:
        while self.main_thread_todo:
            self.main_thread_todo.pop(0)()
            self.main_thread_done.set()

    def _targets(self) -> dict[str, list[int] | bool]:
        out: dict[str, list[int] | bool] = {}
        drv = self.driver
        running = drv is not None and drv.poll() is None
        for kind in self.todo:
            if kind in self.STAGE_BOUND:
                pids = self.cluster.workers_matching(*self.STAGE_BOUND[kind]) if running else []
                if pids:
                    out[kind] = pids
            elif running:  # a node, the driver, the S3 server: only while a job runs
                out[kind] = True
        return out

    def run(self) -> None:
        next_at = time.monotonic() + self.rng.uniform(self.min_gap, self.max_gap)
        while self.todo and not self.stopped.is_set():
            time.sleep(0.1)
            with self.lock:
                targets = self._targets()
                if not targets:
                    continue
                bound = [k for k in targets if k in self.STAGE_BOUND]
                if time.monotonic() < next_at and not bound:
                    continue
                kind = self.rng.choice(sorted(bound) if bound else sorted(targets))
                if bound and time.monotonic() < next_at:
                    # a stage-bound target is up: strike at a random moment of its life
                    time.sleep(self.rng.uniform(0.0, 1.5))
                    targets = self._targets()
                    if kind not in targets:
                        continue
                self._inject(kind, targets[kind])
                next_at = time.monotonic() + self.rng.uniform(self.min_gap, self.max_gap)

    def _inject(self, kind: str, target) -> None:
        t = round(time.monotonic() - self.t0, 2)
        rec = {"kind": kind, "t": t, "phase": self.driver_phase}
        try:
            if kind in self.STAGE_BOUND:
                pid = self.rng.choice(target)
                rec["pid"], rec["cmd"] = pid, cmdline(pid)[:80]
                os.kill(pid, signal.SIGKILL)
            elif kind == "worker_node":
                rec["node"] = self.cluster.kill_worker_node(self.rng)
                self.main_thread_done.clear()
                self.main_thread_todo.append(self.cluster.add_worker_node)
                added = self.main_thread_done.wait(120)
                rec["node_added_back"] = added
            elif kind == "driver":
                rec["pid"] = self.driver.pid
                os.killpg(self.driver.pid, signal.SIGKILL)
            elif kind == "s3_server":
                self.s3.stop()
                time.sleep(self.outage_s)
                self.s3.start()
                rec["outage_s"] = self.outage_s
        except ProcessLookupError:
            rec["missed"] = "target already gone"
        self.log.append(rec)
        if "missed" not in rec:
            self.todo.remove(kind)
        print(f"CHAOS {json.dumps(rec)}", flush=True)


# -- running jobs -----------------------------------------------------------------------------
def spawn(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                            start_new_session=True)
    proc._log = out  # type: ignore[attr-defined]
    return proc


def run_phase(name: str, argv_of, killer: Killer | None, env, work: Path, max_attempts: int,
              timeout: float, drivers: list[int]) -> list[dict]:
    attempts = []
    for k in range(1, max_attempts + 1):
        t0 = time.monotonic()
        proc = spawn(argv_of(k), work / f"{name}-{k}.log", env, work)
        drivers.append(proc.pid)
        if killer is not None:
            with killer.lock:
                killer.driver, killer.driver_phase = proc, name
        try:
            while proc.poll() is None:
                if killer is not None:
                    killer.run_main_thread_actions()
                if time.monotonic() - t0 > timeout:
                    raise subprocess.TimeoutExpired(proc.args, timeout)
                time.sleep(0.1)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            attempts.append({"phase": name, "attempt": k, "rc": "timeout", "seconds": round(time.monotonic() - t0, 1)})
            break
        finally:
            proc._log.close()
            if killer is not None:
                while not killer.lock.acquire(timeout=0.1):  # it may be waiting for a node to be added
                    killer.run_main_thread_actions()
                killer.driver = None
                killer.lock.release()
                killer.run_main_thread_actions()
        text = (work / f"{name}-{k}.log").read_text(errors="replace")
        attempts.append({"phase": name, "attempt": k, "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                         "retried_lines": [ln.strip() for ln in text.splitlines() if "RETRIED" in ln or "retrying" in ln][:20],
                         "tail": text[-1500:] if rc != 0 else ""})
        if rc == 0:
            break
    return attempts


def reference(ref: Path, env) -> dict:
    """Uninterrupted in-process runs (no Ray): the whole job, and one run per swept rank."""
    done = ref / "DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    runs = {"job": []} | {f"rank{r}": [f"personalization.lora.rank={r}", "generator.types=[cut_paste]"]
                          for r in SWEEP_RANKS}
    script = (
        "import json, sys, time\n"
        "from persrep.config import load_settings\n"
        "from persrep.pipeline import run_pipeline\n"
        "root, runs, base = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
        "out = {}\n"
        "for run_id, extra in runs.items():\n"
        "    t0 = time.monotonic()\n"
        "    s = run_pipeline(load_settings('local', [*base, *extra, f'storage.root={root}']), run_id=run_id)\n"
        "    assert s.exit_code == 0, (run_id, s.failures)\n"
        "    out[run_id] = round(time.monotonic() - t0, 1)\n"
        "print('SECONDS ' + json.dumps(out))\n")
    p = subprocess.run([sys.executable, "-c", script, str(ref / "root"), json.dumps(runs), json.dumps(SETTINGS)],
                       env=env, cwd=str(ref), capture_output=True, text=True, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("SECONDS ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"reference failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
    seconds = json.loads(lines[-1][len("SECONDS "):])
    doc = {"seconds": seconds}
    done.write_text(json.dumps(doc))
    return doc


def check(root: str, ref_root: Path, sweep_name: str) -> dict:
    """Everything the soak promises, measured (the test asserts on it)."""
    import numpy as np
    import pandas as pd

    from persrep.generation.shards import read_unit
    from persrep.storage import Storage

    st, rs = Storage(root), Storage(str(ref_root))
    out: dict = {"stages": {}}
    bad_checksums, partial, rows_bad = [], [], []
    for stage in STAGES:
        got, want = set(st.list_finished(stage)), set(rs.list_finished(stage))
        out["stages"][stage] = {"units": len(got), "reference": len(want), "lost": sorted(want - got),
                                "extra": sorted(got - want)}
        for key in got:
            try:
                st.verify_unit(stage, key)
            except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
                bad_checksums.append(f"{stage}/{key}: {exc}")
        partial += [f"{stage}/{d}" for d in set(st.list_dir(stage)) - got]
    for key in st.list_finished("synthesis"):
        idx = [r["index"] for r in read_unit(st, key, kept_only=False).to_pylist()]
        if len(idx) != len(set(idx)) or len(idx) != st.manifest("synthesis", key).meta["rows"]:
            rows_bad.append(key)
    out.update(bad_checksums=bad_checksums, partial_units=sorted(partial), rows_not_once=rows_bad)

    def frame(storage, path):
        import io

        f = pd.read_parquet(io.BytesIO(storage.read_bytes(path)))
        return f

    # the job: every result row, same keys, values within ATOL
    runs = sorted(st.list_dir("runs"))
    final = [r for r in runs if st.exists(f"runs/{r}/summary.json")]
    job = json.loads(st.read_bytes(f"runs/{final[-1]}/summary.json")) if final else {}
    out["job_summary"] = {"run": final[-1] if final else None, "retries": job.get("retries", []),
                          "failures": job.get("failures", [])}
    got = frame(st, f"runs/{final[-1]}/results.parquet") if final else pd.DataFrame(columns=[*RESULT_KEY, "value"])
    want = frame(rs, "runs/job/results.parquet")
    out["job_results"] = _compare(got, want, RESULT_KEY)
    # the sweep: its per-trial, per-instance rows vs the reference run of that rank
    sweeps = [s for s in st.list_dir("sweeps") if f"-{sweep_name}-" in s] if st.exists("sweeps") else []
    done = [s for s in sweeps if st.exists(f"sweeps/{s}/sweep.json")]
    if not done:
        out["sweep_results"] = {"rows": 0, "missing": ["no finished sweep"], "max_abs_diff": None}
        return out
    srows = frame(st, f"sweeps/{done[-1]}/results.parquet")
    out["sweep_trials"] = json.loads(st.read_bytes(f"sweeps/{done[-1]}/sweep.json"))["trials"]
    parts, wants = [], []
    for r in SWEEP_RANKS:
        sub = srows[srows["personalization.lora.rank"].astype(str) == str(r)]
        ref_r = frame(rs, f"runs/rank{r}/results.parquet")
        ref_r = ref_r[ref_r["model"] != "pretrained"]
        sub = sub[sub["model"] != "pretrained"] if "model" in sub else sub
        parts.append(sub.assign(rank=r))
        wants.append(ref_r.assign(rank=r))
    key = [*RESULT_KEY, "rank"]
    out["sweep_results"] = _compare(pd.concat(parts), pd.concat(wants), key)
    out["sweep_trials_n"] = len(out["sweep_trials"])
    return out


def _compare(got, want, key) -> dict:
    import numpy as np

    key = [k for k in key if k in got.columns and k in want.columns]
    g = got[[*key, "value"]].copy()
    w = want[[*key, "value"]].copy()
    for k in key:
        g[k], w[k] = g[k].astype(str), w[k].astype(str)
    dup = int(g.duplicated(key).sum())
    m = w.merge(g, on=key, how="outer", suffixes=("_ref", "_got"), indicator=True)
    def names(rows):
        return ["/".join(map(str, r)) for r in rows[key].itertuples(index=False)][:10]

    missing = names(m[m["_merge"] == "left_only"])
    extra = names(m[m["_merge"] == "right_only"])
    both = m[m["_merge"] == "both"]
    a, b = both["value_ref"].to_numpy(float), both["value_got"].to_numpy(float)
    same_nan = np.isnan(a) == np.isnan(b)
    diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
    return {"rows": int(len(both)), "duplicated": dup, "missing": missing, "extra": extra,
            "nan_mismatch": int((~same_nan).sum()),
            "max_abs_diff": float(np.nanmax(diff)) if len(diff) else 0.0}


def _stop(killer: Killer) -> None:
    """Stop a killer thread (finishing a node it is adding back); idempotent, also if never started."""
    killer.stopped.set()
    if not killer.is_alive():
        return
    deadline = time.monotonic() + 120
    while killer.is_alive() and time.monotonic() < deadline:
        killer.run_main_thread_actions()
        killer.join(timeout=0.1)


def soak(seed: int, work: Path, faults: int, max_attempts: int, ref_dir: Path | None,
         sweep_faults: int = 2) -> dict:
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    env = job_env()
    t_ref = time.monotonic()
    ref_dir = ref_dir or work / "reference"
    ref = reference(ref_dir, env)
    ref_seconds = round(time.monotonic() - t_ref, 1)

    s3 = S3()
    import boto3

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3.endpoint}
    os.environ.update(creds)
    bucket = f"chaos-{seed}-{os.urandom(3).hex()}"
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/soak"
    ray_tmp = tempfile.mkdtemp(prefix="prc-", dir="/tmp")  # short: Ray's socket paths
    t_up = time.monotonic()
    cluster = ChaosCluster(ray_tmp)
    cluster_up = round(time.monotonic() - t_up, 1)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    kinds = (kinds * (faults // len(KINDS) + 1))[:faults]
    # the sweep's own faults: its data is already published by the job (no synthesis actor), so
    # its trials, its driver, a worker node and the S3 server
    sweep_pool = [k for k in KINDS if k != "synthesis_actor"]
    rng.shuffle(sweep_pool)
    sweep_kinds = (sweep_pool * (sweep_faults // len(sweep_pool) + 1))[:sweep_faults]
    t_chaos = time.monotonic()
    # gaps sized to the work: on a quiet 2-core box the job takes ~30 s and the sweep ~16 s
    # (bench/chaos.json baseline); a fault not spent when its phase ends is reported, not injected
    killer = Killer(rng, cluster, s3, kinds, min_gap=2.0, max_gap=8.0, outage_s=3.0, t0=t_chaos)
    sweep_killer = Killer(rng, cluster, s3, sweep_kinds, min_gap=1.0, max_gap=5.0, outage_s=3.0, t0=t_chaos)
    jenv = job_env(RAY_ADDRESS=cluster.address, **creds)
    drivers: list[int] = []
    attempts: list[dict] = []
    sweep_name = f"chaos{seed}"
    t0 = time.monotonic()
    try:
        killer.start()
        attempts += run_phase("run_all", lambda k: [sys.executable, str(RUN_ALL), "--storage", root,
                                                     "--run-id", f"attempt{k}", *SETTINGS],
                              killer, jenv, work, max_attempts, 900, drivers)
        _stop(killer)  # the job's faults not spent by now are not injected (reported)
        sweep_killer.start()
        attempts += run_phase("sweep", lambda k: [sys.executable, str(SWEEP), "--space", str(SPACE),
                                                   "--storage", root, "--name", f"{sweep_name}-{k}"],
                              sweep_killer, jenv, work, max_attempts, 900, drivers)
    finally:
        _stop(killer)
        _stop(sweep_killer)
        chaos_s = round(time.monotonic() - t0, 1)
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # orphans: every PID the cluster ever had, and every driver (its whole session), must be gone
    deadline = time.monotonic() + 30
    left = [p for p in cluster.seen if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = [p for p in left if alive(p)]
    left_drivers = [p for p in drivers if alive(p)]
    result = check(root, ref_dir / "root", sweep_name)
    s3.stop()
    injected: dict[str, int] = {}
    kills = killer.log + sweep_killer.log
    for rec in kills:
        if "missed" not in rec:
            injected[rec["kind"]] = injected.get(rec["kind"], 0) + 1
    ok = [a for a in attempts if a["rc"] == 0]
    lost = sum(len(v["lost"]) for v in result["stages"].values())
    return {"seed": seed, "faults_planned": kinds, "sweep_faults_planned": sweep_kinds,
            "faults_not_injected": killer.todo + sweep_killer.todo,
            "injected_by_phase": {ph: sum(1 for r in kills if r["phase"] == ph and "missed" not in r)
                                  for ph in ("run_all", "sweep")},
            "injected": injected, "kills": kills, "attempts": attempts,
            "phases_finished": sorted({a["phase"] for a in ok}),
            "survived": len({a["phase"] for a in ok}) == 2 and lost == 0,
            "units_lost": lost, "orphans": sorted(left), "drivers_left": left_drivers,
            "cluster_pids_seen": len(cluster.seen), "seconds": {"reference_in_process": ref["seconds"],
            "reference_step": ref_seconds, "cluster_up": cluster_up, "chaos": chaos_s,
            "attempts": round(sum(a["seconds"] for a in attempts), 1)},
            "atol": ATOL, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=len(KINDS), help="faults to inject during the job (kinds cycle)")
    p.add_argument("--sweep-faults", type=int, default=2, help="faults to inject during the sweep")
    p.add_argument("--max-attempts", type=int, default=8, help="job starts per phase")
    p.add_argument("--workdir", default=None)
    p.add_argument("--reference", default=None, help="reuse an uninterrupted reference directory")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    res = soak(args.seed, work, args.faults, args.max_attempts, Path(args.reference) if args.reference else None,
               args.sweep_faults)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print("SOAK " + json.dumps({k: res[k] for k in ("seed", "injected", "survived", "units_lost", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
