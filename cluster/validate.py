#!/usr/bin/env python
"""Check cluster/ before ``kubectl apply``: CRD schemas, KubeRay's own rules, persrep's policy.

    python cluster/validate.py [--crds DIR]     # exit 0 clean, 1 problems (one per line)

Three layers, each catching what the one before cannot:

1. The CRD's ``openAPIV3Schema`` (KubeRay v1.7, ``ray.io/v1``) via ``jsonschema``: wrong types,
   enum values, missing required fields. KubeRay's schemas don't set ``additionalProperties:
   false``, so jsonschema accepts any unknown field; a second, strict walk flags every field that
   is not declared in ``properties`` (unless ``x-kubernetes-preserve-unknown-fields``), which the
   API server would prune (silently dropping, e.g., a misspelt ``resource:``) or reject.
2. The operator's validation (ray-operator/controllers/ray/utils/validation.go), which rejects
   specs the schema allows: names, min/max replicas, autoscaler v2 vs RAY_enable_autoscaler_v2,
   restartPolicy under v2, token auth needing Ray >= 2.52, RayJob TTL / cluster selection.
3. persrep's policy: head with num-cpus "0", a GPU group with nvidia.com/gpu requests and limits,
   autoscaler v2, token auth, ClusterIP only and no Ingress, requests == limits, pinned images
   consistent with the Dockerfile / pyproject.toml / requirements.lock, no inline credentials,
   Secret and Service references that resolve.

Needs only PyYAML and jsonschema (both in the persrep environment).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent
REPO = CLUSTER_DIR.parent
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "secrets.example.yaml")

# Kinds a persrep deployment is made of; anything else is a surprise worth a look.
ALLOWED_KINDS = {
    ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("apps/v1", "Deployment"),
    ("v1", "Service"), ("v1", "PersistentVolumeClaim"), ("v1", "Secret"),
}
EXPOSING_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute"}
# Fields of metav1.ObjectMeta a manifest may set (the rest are server-populated).
OBJECT_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers",
                      "ownerReferences"}
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYCLUSTER_NAME = 53   # KubeRay: 63 - len("-serve-svc")
MAX_RAYJOB_NAME = 47       # KubeRay: the cluster name appends 6 characters
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")
GPU = "nvidia.com/gpu"
RAY_AUTH_SECRET_KEY = "auth_token"   # the data key KubeRay reads from authOptions.secretName
PLACEHOLDER_PREFIX = "CHANGE-ME"


# ----------------------------------------------------------------------------- loading
@dataclass
class Bundle:
    """Everything the checks look at, loaded once; tests mutate a deep copy of it."""

    docs: dict[str, list[dict]]              # manifest file name -> its YAML documents
    dockerfile: str = ""
    dockerignore: str = ""
    project_version: str = ""
    locked: dict[str, str] = field(default_factory=dict)   # requirements.lock: name -> version

    def copy(self) -> Bundle:
        return copy.deepcopy(self)

    def objects(self, kind: str | None = None):
        for fname, docs in self.docs.items():
            for i, doc in enumerate(docs):
                if kind is None or doc.get("kind") == kind:
                    yield fname, i, doc

    def one(self, kind: str) -> dict:
        found = [doc for _, _, doc in self.objects(kind)]
        if len(found) != 1:
            raise LookupError(f"expected exactly one {kind}, found {len(found)}")
        return found[0]


# libyaml's loader when PyYAML has it: the CRDs are ~1 MB of YAML each (6x faster).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_SafeLoader) if d is not None]


def load_bundle(cluster_dir: Path = CLUSTER_DIR, repo: Path = REPO) -> Bundle:
    docs = {name: load_yaml_docs(cluster_dir / name) for name in MANIFESTS}
    dockerfile = (cluster_dir / "Dockerfile").read_text(encoding="utf-8")
    ignore = cluster_dir / "Dockerfile.dockerignore"
    with open(repo / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    locked = {}
    for line in (repo / "requirements.lock").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            locked[_norm(m.group(1))] = m.group(2)
    return Bundle(docs, dockerfile, ignore.read_text(encoding="utf-8") if ignore.exists() else "",
                  version, locked)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load_crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict]:
    """``{(apiVersion, kind): openAPIV3Schema}`` for every served version of every CRD."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in load_yaml_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schemas[(f"{group}/{version['name']}", kind)] = \
                        version["schema"]["openAPIV3Schema"]
    return schemas


def default_crd_dir() -> Path | None:
    env = os.environ.get("PERSREP_SHARED_DATA")
    base = Path(env) if env else REPO.parent / "shared" / "data"
    d = base / "kuberay-crds"
    return d if d.is_dir() else None


# ----------------------------------------------------------------------------- layer 1: schema
def _fmt_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out or "."


def schema_errors(obj: dict, schema: dict) -> list[str]:
    """What the CRD's openAPIV3Schema rejects (types, enums, patterns, required fields)."""
    from jsonschema import Draft7Validator

    errors = Draft7Validator(schema).iter_errors(obj)
    return sorted(f"{_fmt_path(e.absolute_path)}: {_short(e.message)}" for e in errors)


def _short(msg: str, limit: int = 200) -> str:
    return msg if len(msg) <= limit else msg[:limit] + "..."


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare: the API server prunes (or, strict, rejects) them.

    Mirrors structural-schema pruning: an object keeps only ``properties``; a map
    (``additionalProperties``) keeps any key; ``x-kubernetes-preserve-unknown-fields`` keeps all;
    an object schema with neither keeps nothing. The root ``metadata`` is ObjectMeta, which the
    API server validates itself, so it is checked against ObjectMeta's writable fields.
    """
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            sub = f"{path}.{key}"
            if path == "" and key == "metadata":
                out += [f"{sub}.{k}: unknown ObjectMeta field" for k in value
                        if k not in OBJECT_META_FIELDS] if isinstance(value, dict) else []
            elif props is not None and key in props:
                out += unknown_fields(value, props[key], sub)
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, sub)
            elif extra is True:
                continue
            else:
                out.append(f"{sub}: unknown field (not in the CRD schema: the API server would "
                           "prune or reject it)")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def check_schemas(bundle: Bundle, schemas: dict[tuple[str, str], dict]) -> list[str]:
    problems = []
    for fname, i, doc in bundle.objects():
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key[0] is None or not str(key[0]).startswith("ray.io/"):
            continue
        schema = schemas.get(key)
        where = f"{fname}#{i} {key[1]}"
        if schema is None:
            problems.append(f"{where}: no served CRD schema for apiVersion {key[0]}")
            continue
        problems += [f"{where}: schema: {e}" for e in schema_errors(doc, schema)]
        problems += [f"{where}: {e}" for e in unknown_fields(doc, schema)]
    return problems


# ----------------------------------------------------------------------------- helpers
def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def ray_cluster_specs(bundle: Bundle):
    """(where, spec) for the RayCluster's spec and every RayJob's embedded rayClusterSpec."""
    for fname, i, doc in bundle.objects("RayCluster"):
        yield f"{fname}#{i} RayCluster.spec", doc.get("spec") or {}
    for fname, i, doc in bundle.objects("RayJob"):
        spec = (doc.get("spec") or {}).get("rayClusterSpec")
        if spec is not None:
            yield f"{fname}#{i} RayJob.spec.rayClusterSpec", spec


def pod_templates(bundle: Bundle):
    """(where, pod template) for every Pod any manifest creates."""
    for where, spec in ray_cluster_specs(bundle):
        head = spec.get("headGroupSpec") or {}
        yield f"{where}.headGroupSpec", head.get("template") or {}
        for g in spec.get("workerGroupSpecs") or []:
            yield f"{where}.workerGroupSpecs[{g.get('groupName')}]", g.get("template") or {}
    for fname, i, doc in bundle.objects("RayJob"):
        tpl = (doc.get("spec") or {}).get("submitterPodTemplate")
        if tpl is not None:
            yield f"{fname}#{i} RayJob.spec.submitterPodTemplate", tpl
    for kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        for fname, i, doc in bundle.objects(kind):
            yield f"{fname}#{i} {kind}.spec.template", (doc.get("spec") or {}).get("template") or {}


def containers(template: dict):
    spec = template.get("spec") or {}
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            yield c


def ray_containers(spec: dict):
    """The Ray container (index 0, as KubeRay assumes) of the head and of every worker group."""
    head = ((spec.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
    if head.get("containers"):
        yield "head", head["containers"][0]
    for g in spec.get("workerGroupSpecs") or []:
        tspec = (g.get("template") or {}).get("spec") or {}
        if tspec.get("containers"):
            yield g.get("groupName"), tspec["containers"][0]


def env_value(container: dict, name: str) -> str | None:
    for e in container.get("env") or []:
        if e.get("name") == name:
            return e.get("value")
    return None


def image_is_pinned(image: str) -> str | None:
    """None when pinned (a digest, or an explicit tag that is not ``latest``), else why not."""
    if not image:
        return "no image"
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (means :latest)"
    tag = last.rsplit(":", 1)[1]
    if tag.lower() == "latest" or tag.lower().startswith("latest-"):
        return f"image {image!r} uses a floating :{tag} tag"
    return None


def image_tag(image: str) -> str:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else ""


def mlflow_host_allowed(allowed: list[str], host: str) -> bool:
    """MLflow's Host-header rule (mlflow.server.security_utils.is_allowed_host_header)."""
    if "*" in allowed:
        return True
    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


# ----------------------------------------------------------------------------- layer 2: operator
def check_operator_rules(bundle: Bundle) -> list[str]:
    """The KubeRay operator's own validation, which the CRD schema does not express."""
    problems = []
    for fname, i, doc in bundle.objects():
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name", "")
        limit = {"RayCluster": MAX_RAYCLUSTER_NAME, "RayJob": MAX_RAYJOB_NAME}.get(kind)
        if limit and (not DNS1035.match(name or "") or len(name) > limit):
            problems.append(f"{fname}#{i} {kind}: metadata.name {name!r} must be a DNS-1035 "
                            f"label of at most {limit} characters")
    for where, spec in ray_cluster_specs(bundle):
        problems += [f"{where}: {p}" for p in _cluster_spec_rules(spec)]
    for fname, i, doc in bundle.objects("RayJob"):
        problems += [f"{fname}#{i} RayJob: {p}" for p in _rayjob_rules(doc.get("spec") or {})]
    return problems


def _cluster_spec_rules(spec: dict) -> list[str]:
    out = []
    head = spec.get("headGroupSpec") or {}
    head_spec = (head.get("template") or {}).get("spec") or {}
    if not head_spec.get("containers"):
        out.append("headGroupSpec should have at least one container")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    options = spec.get("autoscalerOptions") or {}
    groups = [("head", head)] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs") or []]
    names = [n for n, _ in groups[1:]]
    if len(names) != len(set(names)):
        out.append(f"worker group names must be unique: {names}")
    for gname, g in groups:
        params = g.get("rayStartParams") or {}
        if any(params.get(k) for k in RAY_START_RESOURCE_KEYS) and g.get("resources"):
            out.append(f"group {gname}: resources set in both rayStartParams and resources")
        if "labels" in params:
            out.append(f"group {gname}: rayStartParams['labels'] is not supported; use labels")
        if gname == "head":
            continue
        if not ((g.get("template") or {}).get("spec") or {}).get("containers"):
            out.append(f"worker group {gname} should have at least one container")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            out.append(f"worker group {gname} must set minReplicas and maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            out.append(f"worker group {gname}: minReplicas {lo} > maxReplicas {hi}")
        if g.get("idleTimeoutSeconds") is not None and options.get("version") != "v2":
            out.append(f"worker group {gname}: idleTimeoutSeconds needs autoscaler v2")
    head_c = (head_spec.get("containers") or [{}])[0]
    v2_env = any(e.get("name") == "RAY_enable_autoscaler_v2" for e in head_c.get("env") or [])
    if autoscaling and options.get("version") and v2_env:
        out.append("both autoscalerOptions.version and head env RAY_enable_autoscaler_v2 are "
                   "set; use only the former")
    if not autoscaling and env_value(head_c, "RAY_enable_autoscaler_v2") in ("1", "true"):
        out.append("RAY_enable_autoscaler_v2 set while enableInTreeAutoscaling is false")
    if autoscaling and (options.get("version") == "v2" or v2_env):
        for gname, g in groups:
            policy = ((g.get("template") or {}).get("spec") or {}).get("restartPolicy")
            if policy not in (None, "", "Never"):
                out.append(f"group {gname}: restartPolicy must be Never or unset with "
                           f"autoscaler v2, not {policy}")
    if (options.get("idleTimeoutSeconds") or 0) < 0:
        out.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    auth = spec.get("authOptions")
    if auth is not None and auth.get("mode", "token") == "token":
        version = spec.get("rayVersion") or ""
        if not version:
            out.append("token auth needs rayVersion (Ray >= 2.52.0)")
        elif _version_tuple(version) < MIN_RAY_FOR_TOKEN_AUTH:
            out.append(f"token auth needs Ray >= 2.52.0, rayVersion is {version}")
    return out


def _rayjob_rules(spec: dict) -> list[str]:
    out = []
    selector = spec.get("clusterSelector") or {}
    if spec.get("rayClusterSpec") is None and not selector:
        out.append("one of rayClusterSpec or clusterSelector must be set")
    if selector and not selector.get("ray.io/cluster"):
        out.append("clusterSelector needs a non-empty ray.io/cluster")
    if selector and spec.get("suspend"):
        out.append("the clusterSelector mode doesn't support suspend")
    if selector and (spec.get("backoffLimit") or 0) > 0:
        out.append("backoffLimit is incompatible with clusterSelector")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        out.append("suspend needs shutdownAfterJobFinishes")
    ttl = spec.get("ttlSecondsAfterFinished") or 0
    if ttl < 0:
        out.append("ttlSecondsAfterFinished must be non-negative")
    if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        out.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(key) is not None and spec[key] <= 0:
            out.append(f"{key} must be positive")
    if spec.get("submissionMode") == "SidecarMode" and spec.get("submitterPodTemplate"):
        out.append("SidecarMode doesn't support submitterPodTemplate")
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env is not None:
        try:
            parsed = yaml.safe_load(runtime_env)
        except yaml.YAMLError as exc:
            out.append(f"runtimeEnvYAML is not valid YAML: {exc}")
        else:
            if parsed is not None and not isinstance(parsed, dict):
                out.append("runtimeEnvYAML must be a mapping")
    return out


# ----------------------------------------------------------------------------- layer 3: policy
def check_policy(bundle: Bundle) -> list[str]:
    problems = []
    problems += _check_kinds_and_exposure(bundle)
    for where, spec in ray_cluster_specs(bundle):
        problems += [f"{where}: {p}" for p in _ray_cluster_policy(spec)]
    problems += _check_containers(bundle)
    problems += _check_rayjob(bundle)
    problems += _check_secret_refs(bundle)
    problems += _check_mlflow_wiring(bundle)
    problems += _check_images(bundle)
    problems += _check_dockerfile(bundle)
    problems += _check_example_secrets(bundle)
    return problems


def _check_kinds_and_exposure(bundle: Bundle) -> list[str]:
    out = []
    for fname, i, doc in bundle.objects():
        where = f"{fname}#{i} {doc.get('kind')}"
        for key in ("apiVersion", "kind"):
            if not doc.get(key):
                out.append(f"{where}: missing {key}")
        if not (doc.get("metadata") or {}).get("name"):
            out.append(f"{where}: missing metadata.name")
        if doc.get("kind") in EXPOSING_KINDS:
            out.append(f"{where}: {doc.get('kind')} exposes the cluster; use port-forward")
        elif (doc.get("apiVersion"), doc.get("kind")) not in ALLOWED_KINDS:
            out.append(f"{where}: unexpected kind {doc.get('apiVersion')}/{doc.get('kind')}")
        if doc.get("kind") == "Service":
            stype = (doc.get("spec") or {}).get("type", "ClusterIP")
            if stype != "ClusterIP":
                out.append(f"{where}: Service type {stype}; only ClusterIP is allowed")
    return out


def _ray_cluster_policy(spec: dict) -> list[str]:
    out = []
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token":
        out.append("Ray token auth must be on: authOptions.mode: token")
    if not auth.get("secretName"):
        out.append("authOptions.secretName must name our Secret (a stable token for submitters)")
    if auth.get("enableK8sTokenAuth"):
        out.append("enableK8sTokenAuth is unsupported for RayJob; use the token Secret")
    if spec.get("enableInTreeAutoscaling") is not True:
        out.append("enableInTreeAutoscaling must be true")
    if (spec.get("autoscalerOptions") or {}).get("version") != "v2":
        out.append("autoscalerOptions.version must be v2")
    head = spec.get("headGroupSpec") or {}
    if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
        out.append('head rayStartParams num-cpus must be "0" (no work on the head)')
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        out.append(f"head serviceType {head.get('serviceType')}: only ClusterIP")
    svc_type = ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP")
    if svc_type != "ClusterIP":
        out.append(f"headService type {svc_type}: only ClusterIP")
    if head.get("enableIngress") or head.get("ingressOptions"):
        out.append("head Ingress must stay off (dashboard via port-forward only)")
    groups = {g.get("groupName"): g for g in spec.get("workerGroupSpecs") or []}
    for required in ("cpu-small", "gpu"):
        if required not in groups:
            out.append(f"worker group {required!r} is missing")
    for gname, g in groups.items():
        c = (((g.get("template") or {}).get("spec") or {}).get("containers") or [{}])[0]
        res = c.get("resources") or {}
        req, lim = (res.get("requests") or {}).get(GPU), (res.get("limits") or {}).get(GPU)
        if gname == "gpu":
            if req is None or lim is None:
                out.append(f"group gpu must request AND limit {GPU} (requests {req}, limits {lim})")
            elif str(req) != str(lim) or int(str(lim)) < 1:
                out.append(f"group gpu: {GPU} requests {req} != limits {lim} (or < 1)")
            tolerations = ((g.get("template") or {}).get("spec") or {}).get("tolerations") or []
            if not any(t.get("key") == GPU for t in tolerations):
                out.append(f"group gpu needs a toleration for the {GPU} taint")
            if g.get("minReplicas") != 0:
                out.append("group gpu must scale to zero (minReplicas: 0)")
        elif req is not None or lim is not None:
            out.append(f"group {gname} asks for {GPU}; only the gpu group should")
    for gname, c in ray_containers(spec):
        if env_value(c, "MLFLOW_TRACKING_URI") is None:
            out.append(f"group {gname}: Ray container lacks env MLFLOW_TRACKING_URI")
    ar = (spec.get("autoscalerOptions") or {}).get("resources")
    if ar is not None:
        out += [f"autoscalerOptions: {p}" for p in _resource_problems(ar)]
    return out


def _resource_problems(res: dict) -> list[str]:
    out = []
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for r in ("cpu", "memory"):
        if r not in req or r not in lim:
            out.append(f"resources must set {r} in requests and limits")
        elif str(req[r]) != str(lim[r]):
            out.append(f"{r} requests {req[r]} != limits {lim[r]} (want Guaranteed QoS)")
    return out


def _inline_credentials(env: list[dict] | None) -> list[str]:
    return [e.get("name") for e in env or []
            if CREDENTIAL_NAME.search(e.get("name") or "") and "value" in e]


def _check_containers(bundle: Bundle) -> list[str]:
    out = []
    for where, tpl in pod_templates(bundle):
        for c in containers(tpl):
            at = f"{where} container {c.get('name')}"
            out += [f"{at}: {p}" for p in _resource_problems(c.get("resources") or {})]
            why = image_is_pinned(c.get("image") or "")
            if why:
                out.append(f"{at}: {why}")
            for name in _inline_credentials(c.get("env")):
                out.append(f"{at}: env {name} has an inline value; use valueFrom.secretKeyRef")
    return out


def _runtime_env(job_spec: dict) -> dict:
    try:
        parsed = yaml.safe_load(job_spec.get("runtimeEnvYAML") or "") or {}
    except yaml.YAMLError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _check_rayjob(bundle: Bundle) -> list[str]:
    out = []
    clusters = [doc for _, _, doc in bundle.objects("RayCluster")]
    for fname, i, job in bundle.objects("RayJob"):
        where = f"{fname}#{i} RayJob"
        spec = job.get("spec") or {}
        entry = spec.get("entrypoint") or ""
        if "ray_jobs/run_all.py" not in entry or "--config" not in entry:
            out.append(f"{where}: entrypoint should run ray_jobs/run_all.py --config ...")
        if spec.get("shutdownAfterJobFinishes") is not True:
            out.append(f"{where}: shutdownAfterJobFinishes must be true")
        if spec.get("ttlSecondsAfterFinished") is None:
            out.append(f"{where}: set ttlSecondsAfterFinished")
        env_vars = _runtime_env(spec).get("env_vars") or {}
        for name, value in env_vars.items():
            if CREDENTIAL_NAME.search(name):
                out.append(f"{where}: runtimeEnvYAML env_vars {name} inlines a credential")
        working_dir = _runtime_env(spec).get("working_dir")
        workdirs = re.findall(r"^\s*WORKDIR\s+(\S+)", bundle.dockerfile, re.MULTILINE | re.I)
        if not working_dir:
            out.append(f"{where}: runtimeEnvYAML should set working_dir")
        elif workdirs and working_dir != workdirs[-1]:
            out.append(f"{where}: runtimeEnvYAML working_dir {working_dir} is not the image's "
                       f"WORKDIR {workdirs[-1]} (where the Dockerfile puts the code)")
        script = next((t for t in _split(entry) if t.endswith(".py")), None)
        if script and "/" in script and not script.startswith("/"):
            top = script.split("/")[0]
            if not re.search(rf"^\s*COPY\b[^\n]*\s(\./)?{re.escape(top)}/?\s",
                             bundle.dockerfile, re.MULTILINE | re.I):
                out.append(f"{where}: the entrypoint runs {script} but the Dockerfile never "
                           f"copies {top}/ into the image")
        if spec.get("submitterPodTemplate") is None and spec.get("submissionMode", "K8sJobMode") \
                == "K8sJobMode":
            out.append(f"{where}: set submitterPodTemplate (resources of the submitter)")
        labels = (job.get("metadata") or {}).get("labels") or {}
        for cluster in clusters:
            cname = (cluster.get("metadata") or {}).get("name")
            clabels = (cluster.get("metadata") or {}).get("labels") or {}
            part_of = "app.kubernetes.io/part-of"
            if labels.get(part_of) != clabels.get(part_of):
                out.append(f"{where}: label {part_of} {labels.get(part_of)!r} != RayCluster's "
                           f"{clabels.get(part_of)!r}")
            selector = spec.get("clusterSelector")
            if selector and selector != {"ray.io/cluster": cname}:
                out.append(f"{where}: clusterSelector {selector} doesn't select RayCluster {cname}")
            embedded = spec.get("rayClusterSpec")
            if embedded is not None and embedded != cluster.get("spec"):
                diff = _first_difference(embedded, cluster.get("spec"))
                out.append(f"{where}: rayClusterSpec differs from RayCluster {cname}'s spec "
                           f"at {diff}")
    return out


def _split(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path or "."


def _secret_refs(bundle: Bundle):
    """(where, secret name, key or None for a whole-Secret ref, optional) for every reference."""
    for where, spec in ray_cluster_specs(bundle):
        name = (spec.get("authOptions") or {}).get("secretName")
        if name:
            yield f"{where}.authOptions", name, RAY_AUTH_SECRET_KEY, False
        for e in (spec.get("autoscalerOptions") or {}).get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                yield f"{where}.autoscalerOptions", ref.get("name"), ref.get("key"), \
                    bool(ref.get("optional"))
    for where, tpl in pod_templates(bundle):
        for c in containers(tpl):
            at = f"{where} container {c.get('name')}"
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    yield f"{at} env {e.get('name')}", ref.get("name"), ref.get("key"), \
                        bool(ref.get("optional"))
            for src in c.get("envFrom") or []:
                if src.get("secretRef"):
                    yield f"{at} envFrom", src["secretRef"].get("name"), None, False
        for v in (tpl.get("spec") or {}).get("volumes") or []:
            if v.get("secret"):
                yield f"{where} volume {v.get('name')}", v["secret"].get("secretName"), None, False


def _check_secret_refs(bundle: Bundle) -> list[str]:
    """Every referenced Secret (and key) exists in secrets.example.yaml: the documented shape."""
    known: dict[str, set[str]] = {}
    for _, _, doc in bundle.objects("Secret"):
        keys = set((doc.get("stringData") or {})) | set((doc.get("data") or {}))
        known[(doc.get("metadata") or {}).get("name")] = keys
    out = []
    for where, name, key, _optional in _secret_refs(bundle):
        if name not in known:
            out.append(f"{where}: Secret {name!r} is not in secrets.example.yaml")
        elif key is not None and key not in known[name]:
            out.append(f"{where}: Secret {name!r} has no key {key!r} in secrets.example.yaml")
    return out


def _check_mlflow_wiring(bundle: Bundle) -> list[str]:
    """MLFLOW_TRACKING_URI -> a Service -> the MLflow Deployment, whose Host check admits it."""
    out = []
    services = {(d.get("metadata") or {}).get("name"): d for _, _, d in bundle.objects("Service")}
    deployments = [d for _, _, d in bundle.objects("Deployment")]
    uris = []
    for where, spec in ray_cluster_specs(bundle):
        for gname, c in ray_containers(spec):
            uris.append((f"{where} group {gname}", env_value(c, "MLFLOW_TRACKING_URI")))
    for fname, i, job in bundle.objects("RayJob"):
        env_vars = _runtime_env(job.get("spec") or {}).get("env_vars") or {}
        if "MLFLOW_TRACKING_URI" in env_vars:
            uris.append((f"{fname}#{i} RayJob runtimeEnvYAML", env_vars["MLFLOW_TRACKING_URI"]))
    for where, uri in uris:
        if not uri:
            continue
        parsed = urlparse(uri)
        host = (parsed.hostname or "").split(".")[0]
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        svc = services.get(host)
        if svc is None:
            out.append(f"{where}: MLFLOW_TRACKING_URI {uri} names no Service in the manifests")
            continue
        ports = (svc.get("spec") or {}).get("ports") or []
        if not any(p.get("port") == port for p in ports):
            out.append(f"{where}: Service {host} has no port {port} ({uri})")
        selector = (svc.get("spec") or {}).get("selector") or {}
        backends = [d for d in deployments if selector and selector.items() <=
                    (((d.get("spec") or {}).get("template") or {}).get("metadata") or {})
                    .get("labels", {}).items()]
        if not backends:
            out.append(f"{where}: Service {host} selects no Deployment's Pods")
        for d in backends:
            out += _mlflow_backend_problems(where, d, svc, parsed.netloc)
    return out


def _mlflow_backend_problems(where: str, deployment: dict, svc: dict, netloc: str) -> list[str]:
    out = []
    tpl = (deployment.get("spec") or {}).get("template") or {}
    cs = list(containers(tpl))
    named_ports = {p.get("name"): p.get("containerPort") for c in cs for p in c.get("ports") or []}
    numbers = set(named_ports.values())
    for p in (svc.get("spec") or {}).get("ports") or []:
        target = p.get("targetPort", p.get("port"))
        if (isinstance(target, str) and target not in named_ports) or \
                (isinstance(target, int) and target not in numbers):
            out.append(f"{where}: Service port {p.get('port')} targets {target!r}, which no "
                       "container port of the MLflow Pod matches")
    mlflow_c = next((c for c in cs if "mlflow" in " ".join(c.get("command") or [])
                     + " " + " ".join(c.get("args") or [])), None)
    if mlflow_c is None:
        return out + [f"{where}: the Service's Pods don't run `mlflow server`"]
    args = " ".join((mlflow_c.get("command") or []) + (mlflow_c.get("args") or []))
    for flag in ("--serve-artifacts", "--artifacts-destination", "--backend-store-uri"):
        if flag not in args:
            out.append(f"{where}: mlflow server lacks {flag}")
    allowed = env_value(mlflow_c, "MLFLOW_SERVER_ALLOWED_HOSTS")
    if allowed is not None:
        hosts = [h.strip() for h in allowed.split(",")]
        if not mlflow_host_allowed(hosts, netloc):
            out.append(f"{where}: MLflow's MLFLOW_SERVER_ALLOWED_HOSTS rejects Host {netloc!r}")
    elif not re.match(r"^(localhost|127\.|10\.|192\.168\.)", netloc):
        out.append(f"{where}: MLflow's default Host check rejects {netloc!r}; set "
                   "MLFLOW_SERVER_ALLOWED_HOSTS")
    return out


def _dockerfile_from(dockerfile: str) -> str | None:
    for line in dockerfile.splitlines():
        m = re.match(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.IGNORECASE)
        if m:
            return m.group(1)
    return None


def _check_images(bundle: Bundle) -> list[str]:
    """One persrep image everywhere, its tag = <pyproject version>-ray<rayVersion>-gpu, matching
    the Dockerfile's base and the lock; the MLflow server on the lock's MLflow version."""
    out = []
    ray_images = set()
    ray_versions = set()
    for where, spec in ray_cluster_specs(bundle):
        ray_versions.add(spec.get("rayVersion"))
        for _, c in ray_containers(spec):
            ray_images.add(c.get("image"))
    for _, _, job in bundle.objects("RayJob"):
        tpl = (job.get("spec") or {}).get("submitterPodTemplate") or {}
        ray_images |= {c.get("image") for c in containers(tpl)}
    if len(ray_images) > 1:
        out.append(f"Ray pods use different images: {sorted(map(str, ray_images))}")
    if len(ray_versions) > 1:
        out.append(f"rayVersion differs between manifests: {sorted(map(str, ray_versions))}")
    base = _dockerfile_from(bundle.dockerfile)
    m_base = re.match(r"^rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cu\d+)$", base or "")
    if not m_base:
        out.append(f"Dockerfile FROM {base!r}: want rayproject/ray:<x.y.z>-py311-gpu (pinned)")
    locked_ray = bundle.locked.get("ray")
    for image in sorted(i for i in ray_images if i):
        m = re.match(r"^(?P<version>\d+\.\d+\.\d+)-ray(?P<ray>\d+\.\d+\.\d+)-(?P<flavor>gpu|cpu)$",
                     image_tag(image))
        if not m:
            out.append(f"image {image}: tag should read <persrep version>-ray<ray version>-gpu")
            continue
        if m["version"] != bundle.project_version:
            out.append(f"image {image}: persrep {m['version']} != pyproject.toml "
                       f"{bundle.project_version}")
        for version in ray_versions:
            if m["ray"] != version:
                out.append(f"image {image}: Ray {m['ray']} != rayVersion {version}")
        if m_base and m["ray"] != m_base.group(1):
            out.append(f"image {image}: Ray {m['ray']} != Dockerfile base {base}")
        if locked_ray and m["ray"] != locked_ray:
            out.append(f"image {image}: Ray {m['ray']} != requirements.lock ray=={locked_ray}")
    locked_mlflow = bundle.locked.get("mlflow")
    for _, _, dep in bundle.objects("Deployment"):
        for c in containers((dep.get("spec") or {}).get("template") or {}):
            image = c.get("image") or ""
            if "mlflow" in image.split("@")[0].rsplit("/", 1)[-1] and locked_mlflow:
                version = re.sub(r"^v", "", image_tag(image)).split("-")[0]
                if version != locked_mlflow:
                    out.append(f"MLflow server image {image} != requirements.lock "
                               f"mlflow=={locked_mlflow}")
    return out


def _check_dockerfile(bundle: Bundle) -> list[str]:
    out = []
    text = bundle.dockerfile
    base = _dockerfile_from(text)
    why = image_is_pinned(base or "")
    if why:
        out.append(f"Dockerfile FROM: {why}")
    users = re.findall(r"^\s*USER\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        out.append("Dockerfile must end as a non-root USER (the Ray image's `ray`)")
    for m in re.finditer(r"^\s*(ENV|ARG)\s+(.+)$", text, re.MULTILINE | re.IGNORECASE):
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", m.group(2)):
            if CREDENTIAL_NAME.search(name):
                out.append(f"Dockerfile {m.group(1)} {name}: credentials must not be baked in")
    if not re.search(r"pip install[^\n]*-c requirements\.lock", text):
        out.append("Dockerfile must install with the pins: pip install -c requirements.lock")
    ignored = {line.strip().rstrip("/") for line in bundle.dockerignore.splitlines()}
    for needed in (".venv", ".git"):
        if needed not in ignored:
            out.append(f"Dockerfile.dockerignore must exclude {needed}")
    return out


def _check_example_secrets(bundle: Bundle) -> list[str]:
    out = []
    for fname, i, doc in bundle.objects("Secret"):
        name = (doc.get("metadata") or {}).get("name")
        if fname != "secrets.example.yaml":
            out.append(f"{fname}#{i}: Secret {name} outside secrets.example.yaml")
        if doc.get("data"):
            out.append(f"{fname}#{i}: Secret {name} uses data; use placeholder stringData")
        for key, value in (doc.get("stringData") or {}).items():
            if not str(value).startswith(PLACEHOLDER_PREFIX):
                out.append(f"{fname}#{i}: Secret {name} key {key} is not a {PLACEHOLDER_PREFIX} "
                           "placeholder")
    return out


# ----------------------------------------------------------------------------- entry points
def check(bundle: Bundle, schemas: dict[tuple[str, str], dict] | None = None) -> list[str]:
    """All problems, one line each; empty when everything passes. Schemas optional."""
    problems = []
    if schemas is not None:
        problems += check_schemas(bundle, schemas)
    problems += check_operator_rules(bundle)
    problems += check_policy(bundle)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crds", type=Path, default=None,
                   help="folder of KubeRay CRD YAMLs (default ../shared/data/kuberay-crds)")
    args = p.parse_args(argv)
    crd_dir = args.crds or default_crd_dir()
    schemas = None
    if crd_dir is not None and crd_dir.is_dir():
        schemas = load_crd_schemas(crd_dir)
    else:
        print("warning: no KubeRay CRDs found; schema checks skipped (pass --crds DIR)",
              file=sys.stderr)
    problems = check(load_bundle(), schemas)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s)" if problems else "cluster/: all checks passed",
          file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
