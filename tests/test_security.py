"""Security: no code executed from data or settings, weights only as safetensors, no planted
secret anywhere a full ``run_all`` writes or prints.

1. A static scan (``ast``) of ``persrep/`` and ``ray_jobs/`` for ``eval``/``exec``, pickle-family
   loads (``pickle``, ``cloudpickle``, ``dill``, ``joblib``, ``marshal``, ``shelve``,
   ``pandas.read_pickle``), ``torch.load`` without ``weights_only=True``, ``yaml.load`` without a
   safe loader, ``np.load(allow_pickle=True)``. The scanner is tested on snippets first, so it
   can fail; the one reviewed exception is listed with its reason and must still exist.
2. One full ``ray_jobs/run_all.py`` on local Ray (DreamBooth generators, cut-and-paste and
   real-only adapters, tracking on its default SQLite store) with secrets planted in the
   environment (``AWS_SECRET_ACCESS_KEY``, a token) and in a storage setting (the password of
   ``storage.s3_endpoint``). Then: every published weight file is safetensors (and nothing
   published is a pickle); no secret in the job's stdout/stderr, the Ray session's logs, any byte
   under the storage root (summary.json/md, settings.yaml, the HTML report, the MLflow database
   and artifacts, the units) or in any MLflow param, tag or metric name. test_tracking.py checks
   the redaction rules themselves on the Tracker; this is the whole job.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import finish, job_env, run_all_argv, spawn  # noqa: E402
from worlds import TINY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# -- 1. static scan ------------------------------------------------------------------------------
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "ray.cloudpickle", "dill", "joblib",
                  "marshal", "shelve"}
PICKLE_FUNCS = {"load", "loads", "Unpickler", "open", "load_all"}
# (file, call) -> why it is acceptable. Reviewed; the test fails when an entry goes stale.
ALLOWED = {
    ("persrep/distributed/tune_stage.py", "ray.cloudpickle.load"):
        "Ray Tune's own pickled trial error, written by this job's Tune driver into its experiment "
        "directory (Tuner.restore unpickles that directory anyway); read to name a failed trial's "
        "root cause",
    ("persrep/registry.py", "importlib.import_module"):
        "imports only a module named in the fixed built-in tables of the registries (generators, "
        "segmenters, tasks; settings choose among them; an unknown name is refused)",
}


def _qualname(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load`` through the file's import aliases."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, filename: str = "<snippet>") -> list[tuple[int, str, str]]:
    """(line, call, problem) for every unsafe call in ``source``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualname(node.func, aliases)
        if name is None:
            continue
        mod, _, func = name.rpartition(".")
        problem = None
        if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile", "builtins.compile",
                    "__import__", "importlib.import_module"):
            problem = "executes code given as data"
        elif mod in PICKLE_MODULES and func in PICKLE_FUNCS:
            problem = "unpickles (runs code from the bytes)"
        elif name in ("pandas.read_pickle", "torch.jit.load"):
            problem = "unpickles (runs code from the bytes)"
        elif name == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            problem = "torch.load without weights_only=True"
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            problem = "unsafe YAML loader"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            lname = _qualname(loader, aliases) if loader is not None else None
            if lname not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
                problem = "yaml.load without SafeLoader"
        elif name == "numpy.load" and not (_kw(node, "allow_pickle") is None
                                           or _is_const(_kw(node, "allow_pickle"), False)):
            problem = "np.load with allow_pickle"
        if problem:
            found.append((node.lineno, name, problem))
    return found


UNSAFE_SNIPPETS = {
    "eval(text)": "eval",
    "exec(code)": "exec",
    "import pickle\npickle.loads(b)": "pickle.loads",
    "import pickle as pk\npk.load(f)": "pickle.load",
    "from pickle import loads\nloads(b)": "pickle.loads",
    "import ray.cloudpickle as cloudpickle\ncloudpickle.load(f)": "ray.cloudpickle.load",
    "import cloudpickle\ncloudpickle.loads(b)": "cloudpickle.loads",
    "import dill\ndill.load(f)": "dill.load",
    "import pandas as pd\npd.read_pickle(p)": "pandas.read_pickle",
    "import torch\ntorch.load(p)": "torch.load",
    "import torch\ntorch.load(p, weights_only=False)": "torch.load",
    "import torch\ntorch.load(p, weights_only=flag)": "torch.load",
    "import yaml\nyaml.load(t)": "yaml.load",
    "import yaml\nyaml.load(t, Loader=yaml.Loader)": "yaml.load",
    "import yaml\nyaml.unsafe_load(t)": "yaml.unsafe_load",
    "import yaml\nyaml.full_load(t)": "yaml.full_load",
    "import numpy as np\nnp.load(p, allow_pickle=True)": "numpy.load",
}
SAFE_SNIPPETS = [
    "model.eval()", "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load(t)", "import yaml\nyaml.load(t, Loader=yaml.SafeLoader)",
    "import numpy as np\nnp.load(p)", "import numpy as np\nnp.load(p, allow_pickle=False)",
    "import json\njson.loads(t)", "from safetensors.torch import load_file\nload_file(p)",
]


@pytest.mark.parametrize("snippet", sorted(UNSAFE_SNIPPETS))
def test_scanner_flags_each_unsafe_call(snippet):
    assert [c for _, c, _ in scan_source(snippet)] == [UNSAFE_SNIPPETS[snippet]]


@pytest.mark.parametrize("snippet", SAFE_SNIPPETS)
def test_scanner_passes_safe_calls(snippet):
    assert scan_source(snippet) == []


def test_no_code_from_data_or_settings_in_persrep_and_ray_jobs():
    files = sorted([*(REPO / "persrep").rglob("*.py"), *(REPO / "ray_jobs").rglob("*.py")])
    assert len(files) > 40
    hits, used = [], set()
    for path in files:
        rel = str(path.relative_to(REPO))
        for line, call, problem in scan_source(path.read_text(), rel):
            if (rel, call) in ALLOWED:
                used.add((rel, call))
            else:
                hits.append(f"{rel}:{line}: {call}: {problem}")
    assert hits == [], "\n".join(hits)
    assert used == set(ALLOWED), f"stale allowlist entries: {set(ALLOWED) - used}"


# -- 2. one full run with planted secrets ---------------------------------------------------------
AWS_KEY_ID = "AKIAPLNTDKEY7Q2W3E4R"
AWS_SECRET = "pLanted/Secret+Key0123456789abcdefGHIJKL"  # the 40-character AWS shape
API_TOKEN = "tok-planted-5f4e3d2c1b0a"
ENDPOINT_PASSWORD = "EndpointPassw0rd-planted"
SECRETS = [AWS_KEY_ID, AWS_SECRET, API_TOKEN, ENDPOINT_PASSWORD]
RUN = [*TINY, "data.toy.instances_per_category=1", "generator.types=[real_only, cut_paste, dreambooth]",
       "evaluation.tasks=[classification, retrieval]", "resources.num_cpus=2",
       f"storage.s3_endpoint=http://persrep:{ENDPOINT_PASSWORD}@127.0.0.1:9/?token={API_TOKEN}"]
# Known upstream leak, outside persrep: Ray Tune copies AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
# AWS_SESSION_TOKEN from the driver's environment into each trainable's runtime_env
# (ray/tune/execution/class_cache.py), and Ray's runtime-env agent logs runtime envs at INFO in
# <session>/logs/runtime_env_agent.log (ray-project/ray#28276, open; ray#29985 confined them to that
# file). See docs/RELIABILITY.md for the mitigation.
UPSTREAM_LEAKS = {("runtime_env_agent.log", AWS_KEY_ID), ("runtime_env_agent.log", AWS_SECRET)}
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
PUBLISHED = ("generators", "synthesis", "adapters", "evaluations", "runs", "mlartifacts")


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("secrets")
    root, logs = base / "root", base / "logs"
    ray_tmp = tempfile.mkdtemp(prefix="prs-", dir="/tmp")  # short: Ray's socket paths
    env = job_env(AWS_ACCESS_KEY_ID=AWS_KEY_ID, AWS_SECRET_ACCESS_KEY=AWS_SECRET,
                  PERSREP_API_TOKEN=API_TOKEN, RAY_TMPDIR=ray_tmp, HOME=str(base / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: <root>/mlflow.db
    proc = spawn(run_all_argv(root, "planted", *RUN, ray=True), logs, "job", env)
    rc = finish(proc, timeout=500)
    yield {"rc": rc, "root": root, "logs": logs, "ray_tmp": Path(ray_tmp), "base": base}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_planted_run_finished(planted_run):
    err = (planted_run["logs"] / "job.err").read_text()
    assert planted_run["rc"] == 0, err[-3000:]
    doc = json.loads((planted_run["root"] / "runs" / "planted" / "summary.json").read_text())
    assert doc["stages"]["generator_prep"]["done"] == 2 and doc["failures"] == []
    assert (planted_run["root"] / "runs" / "planted" / "report" / "report.html").is_file()
    assert (planted_run["root"] / "mlflow.db").is_file()


def test_weights_are_published_only_as_safetensors(planted_run):
    from safetensors import safe_open

    root = planted_run["root"]
    weights, kinds = [], set()
    for top in PUBLISHED:
        for p in (root / top).rglob("*") if (root / top).is_dir() else ():
            if not p.is_file():
                continue
            kinds.add(p.suffix)
            head = p.read_bytes()[:4]
            assert not head.startswith(PICKLE_MAGIC), f"{p} is a pickle"
            assert not (head == b"PK\x03\x04" and b"data.pkl" in p.read_bytes()), f"{p} is a torch.save zip"
            if p.suffix == ".safetensors":
                with safe_open(str(p), "pt") as f:
                    assert list(f.keys()), p
                weights.append(p.relative_to(root).parts[0])
    assert {"generators", "adapters"} <= set(weights)  # DreamBooth LoRA weights and adapters
    unit_kinds = {p.suffix for top in ("generators", "adapters", "synthesis", "evaluations")
                  for p in (root / top).rglob("*") if p.is_file()}
    assert unit_kinds <= {".safetensors", ".json", ".parquet"}, unit_kinds


def _all_files(*dirs: Path):
    for d in dirs:
        if d.is_dir():
            yield from (p for p in d.rglob("*") if p.is_file())


def test_no_planted_secret_in_logs_reports_tracking_or_storage(planted_run):
    root = planted_run["root"]
    scanned = list(_all_files(planted_run["logs"], planted_run["ray_tmp"], root))
    names = {p.name for p in scanned}
    assert {"job.out", "job.err", "summary.json", "summary.md", "settings.yaml", "report.html",
            "mlflow.db"} <= names, sorted(names)[:50]
    assert any("raylet" in p.name for p in scanned)  # the Ray session's logs are in the scan
    leaks = {(p, secret) for p in scanned for secret in SECRETS if secret.encode() in p.read_bytes()}
    unexpected = [f"{s[:8]}... in {p}" for p, s in sorted(leaks) if (p.name, s) not in UPSTREAM_LEAKS]
    assert unexpected == [], "\n".join(unexpected)
    # the known upstream leak is still there; when Ray stops logging it, drop UPSTREAM_LEAKS
    assert {(p.name, s) for p, s in leaks} == UPSTREAM_LEAKS


def test_mlflow_params_and_tags_hold_no_secret_but_the_redacted_setting(planted_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{planted_run['root'] / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) >= 1 + 6  # the parent and one nested run per adapter at least
    text = json.dumps([[r.data.params, r.data.tags, sorted(r.data.metrics)] for r in runs])
    assert not [s for s in SECRETS if s in text]
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["storage.s3_endpoint"].startswith("http://***@127.0.0.1:9")
