"""cluster/: KubeRay manifests, MLflow server, Dockerfile and README, checked without a cluster.

The checks live in cluster/validate.py (also a CLI). Here: every manifest parses; the RayCluster and
RayJob pass the real KubeRay v1.7 CRD schemas (../shared/data/kuberay-crds) plus a strict
unknown-field walk; the operator's rules and our policy hold; names, Secrets, images and versions
agree across files. Each rule is also shown to *fail* on a mutated copy of the real manifests.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


V = _load_module("persrep_cluster_validate", CLUSTER / "validate.py")


@pytest.fixture(scope="module")
def bundle():
    return V.load_bundle()


@pytest.fixture(scope="module")
def schemas(shared_data):
    crd_dir = shared_data / "kuberay-crds"
    if not crd_dir.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {crd_dir}")
    return V.load_crd_schemas(crd_dir)


def _cluster(b):
    return b.one("RayCluster")["spec"]


def _job(b):
    return b.one("RayJob")["spec"]


def _group(spec, name):
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def _container(group_or_head):
    return group_or_head["template"]["spec"]["containers"][0]


def _env(container, name):
    return next(e for e in container["env"] if e["name"] == name)


# ----------------------------------------------------------------------------- parsing
def test_every_yaml_in_cluster_is_a_checked_manifest():
    """A new manifest can't slip past the checks: validate.py must know every YAML file."""
    on_disk = {p.name for p in CLUSTER.glob("*.y*ml")}
    assert on_disk == set(V.MANIFESTS)


@pytest.mark.parametrize("name", V.MANIFESTS)
def test_manifest_parses_into_named_objects(name):
    docs = V.load_yaml_docs(CLUSTER / name)
    assert docs, f"{name} has no documents"
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def test_crds_serve_ray_io_v1(schemas):
    assert ("ray.io/v1", "RayCluster") in schemas
    assert ("ray.io/v1", "RayJob") in schemas


# ----------------------------------------------------------------------------- the real files pass
def test_ray_objects_pass_crd_schema_and_strict_walk(bundle, schemas):
    assert V.check_schemas(bundle, schemas) == []


def test_all_checks_pass(bundle, schemas):
    assert V.check(bundle, schemas) == []


def test_policy_checks_pass_without_crds(bundle):
    """The non-schema layers run even where ../shared/data is absent."""
    assert V.check(bundle) == []


def test_cli_exit_codes(schemas, shared_data, monkeypatch, capsys):
    crds = ["--crds", str(shared_data / "kuberay-crds")]
    monkeypatch.setattr(V, "load_crd_schemas", lambda _dir: schemas)   # parsed once already
    assert V.main(crds) == 0
    broken = V.load_bundle()
    broken.one("RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "2"
    monkeypatch.setattr(V, "load_bundle", lambda: broken)
    assert V.main(crds) == 1
    assert 'num-cpus must be "0"' in capsys.readouterr().out


# ----------------------------------------------------------------------------- what the files say
def test_head_takes_no_work_and_is_not_exposed(bundle):
    head = _cluster(bundle)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress")
    kinds = {d["kind"] for _, _, d in bundle.objects()}
    assert "Ingress" not in kinds
    for _, _, svc in bundle.objects("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_gpu_group_requests_and_limits_one_gpu_and_scales_from_zero(bundle):
    gpu = _group(_cluster(bundle), "gpu")
    res = _container(gpu)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 8
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        gpu["template"]["spec"]["tolerations"]
    small = _container(_group(_cluster(bundle), "cpu-small"))["resources"]
    assert "nvidia.com/gpu" not in small["limits"]


def test_autoscaler_v2_via_crd_field_not_env(bundle):
    spec = _cluster(bundle)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    head_env = {e["name"] for e in _container(spec["headGroupSpec"])["env"]}
    assert "RAY_enable_autoscaler_v2" not in head_env   # the operator rejects both at once


def test_token_auth_on_with_our_secret(bundle):
    for _, spec in V.ray_cluster_specs(bundle):
        assert spec["authOptions"] == {"mode": "token", "secretName": "persrep-ray-auth"}
        assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0)
    secret = next(d for _, _, d in bundle.objects("Secret")
                  if d["metadata"]["name"] == "persrep-ray-auth")
    assert "auth_token" in secret["stringData"]   # the key KubeRay reads


def test_s3_credentials_come_from_the_secret(bundle):
    for _, spec in V.ray_cluster_specs(bundle):
        for _, c in V.ray_containers(spec):
            ref = _env(c, "AWS_SECRET_ACCESS_KEY")["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "persrep-s3", "key": "AWS_SECRET_ACCESS_KEY"}
            assert _env(c, "MLFLOW_TRACKING_URI")["value"] == "http://persrep-mlflow:5000"


def test_rayjob_embeds_the_raycluster_spec_and_cleans_up(bundle):
    job = _job(bundle)
    assert job["rayClusterSpec"] == _cluster(bundle)
    assert "clusterSelector" not in job
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["entrypointNumCpus"] >= 1   # the driver needs a CPU: the head has none
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/persrep"


def test_images_pinned_and_consistent(bundle):
    images = {c["image"] for _, spec in V.ray_cluster_specs(bundle) for _, c in V.ray_containers(spec)}
    images |= {c["image"] for c in _job(bundle)["submitterPodTemplate"]["spec"]["containers"]}
    ray = bundle.locked["ray"]
    assert ray.startswith("2.60.")
    assert images == {f"ghcr.io/persrep/persrep:{bundle.project_version}-ray{ray}-gpu"}
    assert V._dockerfile_from(bundle.dockerfile) == f"rayproject/ray:{ray}-py311-gpu"
    assert {spec["rayVersion"] for _, spec in V.ray_cluster_specs(bundle)} == {ray}
    mlflow_image = _container(bundle.one("Deployment")["spec"])["image"]
    assert mlflow_image == f"ghcr.io/mlflow/mlflow:v{bundle.locked['mlflow']}-full"


# ----------------------------------------------------------------------------- entry points run
def _run_all_args(argv: list[str]):
    """What ray_jobs/run_all.py would do with argv, up to loading the settings."""
    run_all = _load_module("persrep_run_all_for_tests", REPO / "ray_jobs" / "run_all.py")
    from persrep.config import load_settings

    args = run_all.parse_args(argv)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.storage:
        overrides.append(f"storage.root={args.storage}")
    return load_settings(args.config, overrides)


def test_rayjob_entrypoint_is_a_valid_run_all_command(bundle):
    argv = shlex.split(_job(bundle)["entrypoint"])
    assert argv[:2] == ["python", "ray_jobs/run_all.py"]
    settings = _run_all_args(argv[2:])
    assert settings.name == "paper"
    assert settings.data.path.startswith("s3://") and settings.storage.root.startswith("s3://")


def _readme_commands(prefix: str) -> list[str]:
    """Shell commands in README code blocks that start with prefix (continuations joined)."""
    text = (CLUSTER / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip().startswith(prefix)]


def test_readme_job_submit_command_is_valid(bundle):
    (cmd,) = _readme_commands("ray job submit")
    head_svc = bundle.one("RayCluster")["metadata"]["name"] + "-head-svc"
    assert f"kubectl port-forward svc/{head_svc} 8265:8265" in " ".join(
        _readme_commands("kubectl port-forward"))
    submit, entry = cmd.split(" -- ", 1)
    assert "--address http://127.0.0.1:8265" in submit and "--entrypoint-num-cpus 1" in submit
    argv = shlex.split(entry)
    assert argv[:2] == ["python", "ray_jobs/run_all.py"]
    assert _run_all_args(argv[2:]).name == "paper"
    assert _readme_commands("export RAY_AUTH_MODE=token")


def test_readme_pins_kuberay_and_applies_every_manifest():
    (helm,) = _readme_commands("helm install kuberay-operator")
    assert "--version 1.7." in helm
    applied = " ".join(_readme_commands("kubectl apply -f"))
    for name in ("mlflow.yaml", "raycluster.yaml", "rayjob.yaml"):
        assert f"cluster/{name}" in applied
    assert "secrets.example.yaml" not in applied   # placeholders are never applied


def test_mlflow_host_check_admits_the_tracking_uri_by_mlflow_s_own_rule(bundle):
    """The Ray pods call http://persrep-mlflow:5000; MLflow >= 3.5 rejects unknown Host headers."""
    from mlflow.server.security_utils import is_allowed_host_header

    mlflow_c = _container(bundle.one("Deployment")["spec"])
    allowed = [h.strip() for h in _env(mlflow_c, "MLFLOW_SERVER_ALLOWED_HOSTS")["value"].split(",")]
    for host in ("persrep-mlflow:5000", "persrep-mlflow", "localhost:5000",
                 "persrep-mlflow.persrep.svc.cluster.local:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example:5000")
    for host in ("persrep-mlflow:5000", "evil.example:5000", "127.0.0.1:8080", "persrep-mlflowx"):
        assert V.mlflow_host_allowed(allowed, host) == is_allowed_host_header(allowed, host)


# ----------------------------------------------------------------------------- strict walk
SCHEMA = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {"type": "object", "properties": {
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "opaque": {"type": "object"},
            "items": {"type": "array", "items": {"type": "object",
                                                 "properties": {"name": {"type": "string"}}}},
        }},
    },
}


def test_strict_walk_follows_structural_pruning():
    ok = {"metadata": {"name": "x", "labels": {"a": "b"}},
          "spec": {"labels": {"any": "key"}, "free": {"any": {"thing": 1}},
                   "items": [{"name": "a"}]}}
    assert V.unknown_fields(ok, SCHEMA) == []
    bad = {"metadata": {"name": "x", "labelz": {}},
           "spec": {"opaque": {"x": 1}, "items": [{"name": "a", "nmae": "b"}], "extra": 1}}
    flagged = {p.split(":")[0] for p in V.unknown_fields(bad, SCHEMA)}
    assert flagged == {".metadata.labelz", ".spec.opaque.x", ".spec.items[0].nmae", ".spec.extra"}


def test_crd_schema_alone_would_accept_a_misspelt_field(bundle, schemas):
    """Why the strict walk exists: KubeRay's schema lets `resource:` (typo) through, and the API
    server would silently prune it, leaving the GPU pod without limits."""
    b = bundle.copy()
    c = _container(_group(_cluster(b), "gpu"))
    c["resource"] = c.pop("resources")
    schema = schemas[("ray.io/v1", "RayCluster")]
    assert V.schema_errors(b.one("RayCluster"), schema) == []
    assert any(".containers[0].resource: unknown field" in p
               for p in V.unknown_fields(b.one("RayCluster"), schema))


# ----------------------------------------------------------------------------- mutations fail
def _set(path_fn, value):
    def mutate(b):
        obj, key = path_fn(b)
        obj[key] = value
    return mutate


def _delete(path_fn):
    def mutate(b):
        obj, key = path_fn(b)
        del obj[key]
    return mutate


def _add_doc(fname, doc):
    def mutate(b):
        b.docs[fname].append(doc)
    return mutate


def _append_env(where_fn, entry):
    def mutate(b):
        where_fn(b)["env"].append(entry)
    return mutate


def _head(b):
    return _cluster(b)["headGroupSpec"]


def _gpu_container(b):
    return _container(_group(_cluster(b), "gpu"))


SCHEMA_MUTATIONS = [
    ("unknown field", _set(lambda b: (_head(b), "rayStartParam"), {}),
     ".spec.headGroupSpec.rayStartParam: unknown field"),
    ("unknown field in a container", _set(lambda b: (_gpu_container(b), "gpus"), 1),
     ".containers[0].gpus: unknown field"),
    ("unknown field in the RayJob", _set(lambda b: (_job(b), "shutdownAfterJobFinish"), True),
     ".spec.shutdownAfterJobFinish: unknown field"),
    ("required field removed", _delete(lambda b: (_group(_cluster(b), "gpu"), "groupName")),
     "'groupName' is a required property"),
    ("container name removed", _delete(lambda b: (_gpu_container(b), "name")),
     "'name' is a required property"),
    ("rayStartParams value not a string", _set(lambda b: (_head(b)["rayStartParams"], "num-cpus"), 0),
     "0 is not of type 'string'"),
    ("bad enum", _set(lambda b: (_cluster(b)["authOptions"], "mode"), "on"),
     "'on' is not one of ['disabled', 'token']"),
    ("bad quantity", _set(lambda b: (_gpu_container(b)["resources"]["limits"], "memory"), "64 GB"),
     "does not match"),
    ("unknown ObjectMeta field", _set(lambda b: (b.one("RayJob")["metadata"], "label"), {}),
     ".metadata.label: unknown ObjectMeta field"),
]


@pytest.mark.parametrize("name,mutate,expected", SCHEMA_MUTATIONS,
                         ids=[m[0] for m in SCHEMA_MUTATIONS])
def test_schema_layer_flags_mutation(bundle, schemas, name, mutate, expected):
    b = bundle.copy()
    mutate(b)
    problems = V.check_schemas(b, schemas)
    assert any(expected in p for p in problems), problems


INGRESS = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
           "metadata": {"name": "persrep-dashboard"}, "spec": {}}
S3_SECRET_REF = {"name": "persrep-s3", "key": "AWS_SECRET"}

POLICY_MUTATIONS = [
    ("head gets CPUs", _set(lambda b: (_head(b)["rayStartParams"], "num-cpus"), "4"),
     'num-cpus must be "0"'),
    ("gpu limit removed", _delete(lambda b: (_gpu_container(b)["resources"]["limits"], "nvidia.com/gpu")),
     "must request AND limit nvidia.com/gpu"),
    ("gpu toleration removed", _set(lambda b: (_group(_cluster(b), "gpu")["template"]["spec"],
                                               "tolerations"), []),
     "toleration for the nvidia.com/gpu taint"),
    ("gpu group never scales to zero", _set(lambda b: (_group(_cluster(b), "gpu"), "minReplicas"), 1),
     "must scale to zero"),
    ("cpu group removed", lambda b: _cluster(b)["workerGroupSpecs"].pop(0),
     "worker group 'cpu-small' is missing"),
    ("image :latest", _set(lambda b: (_gpu_container(b), "image"), "ghcr.io/persrep/persrep:latest"),
     "floating :latest tag"),
    ("image without tag", _set(lambda b: (_gpu_container(b), "image"), "ghcr.io/persrep/persrep"),
     "has no tag"),
    ("image from another version", _set(lambda b: (_head(b)["template"]["spec"]["containers"][0],
                                                   "image"), "ghcr.io/persrep/persrep:0.2.0-ray2.60.0-gpu"),
     "Ray pods use different images"),
    ("mlflow image unpinned", _set(lambda b: (_container(b.one("Deployment")["spec"]), "image"),
                                   "ghcr.io/mlflow/mlflow"), "has no tag"),
    ("mlflow server version drifts", _set(lambda b: (_container(b.one("Deployment")["spec"]), "image"),
                                          "ghcr.io/mlflow/mlflow:v3.16.0-full"),
     "!= requirements.lock mlflow=="),
    ("cpu request below limit", _set(lambda b: (_gpu_container(b)["resources"]["requests"], "cpu"), "4"),
     "cpu requests 4 != limits 8"),
    ("memory limit missing", _delete(lambda b: (_container(b.one("Deployment")["spec"])["resources"]
                                                ["limits"], "memory")),
     "must set memory in requests and limits"),
    ("submitter without resources", _delete(lambda b: (_job(b)["submitterPodTemplate"]["spec"]
                                                       ["containers"][0], "resources")),
     "must set cpu in requests and limits"),
    ("token auth off", _set(lambda b: (_cluster(b)["authOptions"], "mode"), "disabled"),
     "authOptions.mode: token"),
    ("auth options removed", _delete(lambda b: (_cluster(b), "authOptions")),
     "Ray token auth must be on"),
    ("autoscaler v1", _set(lambda b: (_cluster(b)["autoscalerOptions"], "version"), "v1"),
     "autoscalerOptions.version must be v2"),
    ("autoscaling off", _set(lambda b: (_cluster(b), "enableInTreeAutoscaling"), False),
     "enableInTreeAutoscaling must be true"),
    ("NodePort head", _set(lambda b: (_head(b), "serviceType"), "NodePort"),
     "head serviceType NodePort"),
    ("LoadBalancer MLflow", _set(lambda b: (b.one("Service")["spec"], "type"), "LoadBalancer"),
     "Service type LoadBalancer"),
    ("head ingress", _set(lambda b: (_head(b), "enableIngress"), True), "Ingress must stay off"),
    ("an Ingress object", _add_doc("mlflow.yaml", INGRESS), "Ingress exposes the cluster"),
    ("inline S3 secret", _append_env(_gpu_container, {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
     "env AWS_SECRET_ACCESS_KEY has an inline value"),
    ("inline Ray token", _append_env(lambda b: _head(b)["template"]["spec"]["containers"][0],
                                     {"name": "RAY_AUTH_TOKEN", "value": "abc"}),
     "env RAY_AUTH_TOKEN has an inline value"),
    ("inline MLflow password", _append_env(lambda b: _container(b.one("Deployment")["spec"]),
                                           {"name": "DB_PASSWORD", "value": "hunter2"}),
     "env DB_PASSWORD has an inline value"),
    ("credential in runtime env", _set(lambda b: (_job(b), "runtimeEnvYAML"),
                                       "working_dir: /home/ray/persrep\nenv_vars:\n  AWS_SECRET_ACCESS_KEY: x\n"),
     "runtimeEnvYAML env_vars AWS_SECRET_ACCESS_KEY"),
    ("secret key missing from the example", _set(
        lambda b: (_env(_gpu_container(b), "AWS_SECRET_ACCESS_KEY")["valueFrom"], "secretKeyRef"),
        S3_SECRET_REF), "has no key 'AWS_SECRET'"),
    ("secret missing from the example", _set(lambda b: (_cluster(b)["authOptions"], "secretName"),
                                             "persrep-ray-token"),
     "Secret 'persrep-ray-token' is not in secrets.example.yaml"),
    ("real-looking value in the example", _set(lambda b: (b.docs["secrets.example.yaml"][0]
                                                          ["stringData"], "AWS_ACCESS_KEY_ID"),
                                               "AKIAIOSFODNN7EXAMPLE"),
     "is not a CHANGE-ME placeholder"),
    ("tracking URI to a missing Service", _set(lambda b: (_env(_gpu_container(b), "MLFLOW_TRACKING_URI"),
                                                          "value"), "http://mlflow:5000"),
     "names no Service"),
    ("tracking URI on the wrong port", _set(lambda b: (_env(_gpu_container(b), "MLFLOW_TRACKING_URI"),
                                                       "value"), "http://persrep-mlflow:80"),
     "has no port 80"),
    ("MLflow rejects the Service's Host", _set(
        lambda b: (_env(_container(b.one("Deployment")["spec"]), "MLFLOW_SERVER_ALLOWED_HOSTS"),
                   "value"), "localhost,localhost:*"),
     "rejects Host 'persrep-mlflow:5000'"),
    ("Service selects nothing", _set(lambda b: (b.one("Service")["spec"], "selector"),
                                     {"app.kubernetes.io/name": "mlflow"}),
     "selects no Deployment's Pods"),
    ("Service targets a missing port", _set(lambda b: (b.one("Service")["spec"]["ports"][0],
                                                       "targetPort"), "web"),
     "targets 'web'"),
    ("RayJob cluster spec drifts", _set(lambda b: (_group(_job(b)["rayClusterSpec"], "gpu"),
                                                   "maxReplicas"), 64),
     "rayClusterSpec differs from RayCluster persrep's spec at .workerGroupSpecs[1].maxReplicas"),
    ("RayJob never cleans up", _set(lambda b: (_job(b), "shutdownAfterJobFinishes"), False),
     "shutdownAfterJobFinishes must be true"),
    ("clusterSelector names another cluster", _set(lambda b: (_job(b), "clusterSelector"),
                                                   {"ray.io/cluster": "other"}),
     "doesn't select RayCluster persrep"),
    ("working_dir not the image's", _set(lambda b: (_job(b), "runtimeEnvYAML"),
                                         "working_dir: /app\n"),
     "is not the image's WORKDIR /home/ray/persrep"),
    ("label mismatch", _set(lambda b: (b.one("RayJob")["metadata"]["labels"],
                                       "app.kubernetes.io/part-of"), "other"),
     "label app.kubernetes.io/part-of 'other'"),
    ("Dockerfile base unpinned", lambda b: setattr(b, "dockerfile", b.dockerfile.replace(
        "FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:latest-gpu")),
     "floating :latest-gpu tag"),
    ("Dockerfile base on another Ray", lambda b: setattr(b, "dockerfile", b.dockerfile.replace(
        "rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.59.0-py311-gpu")),
     "!= Dockerfile base rayproject/ray:2.59.0-py311-gpu"),
    ("Dockerfile runs as root", lambda b: setattr(b, "dockerfile", b.dockerfile + "\nUSER root\n"),
     "non-root USER"),
    ("Dockerfile bakes a secret", lambda b: setattr(b, "dockerfile", b.dockerfile +
                                                   "\nENV AWS_SECRET_ACCESS_KEY=abc\n"),
     "ENV AWS_SECRET_ACCESS_KEY"),
    ("Dockerfile ignores the lock", lambda b: setattr(b, "dockerfile", b.dockerfile.replace(
        "-c requirements.lock", "")), "pip install -c requirements.lock"),
    ("Dockerfile forgets ray_jobs", lambda b: setattr(b, "dockerfile", b.dockerfile.replace(
        "COPY --chown=ray:users ray_jobs/ ./ray_jobs/\n", "")), "never copies ray_jobs/"),
    ("venv in the build context", lambda b: setattr(b, "dockerignore", b.dockerignore.replace(
        ".venv\n", "")), "must exclude .venv"),
    ("project version bumped alone", lambda b: setattr(b, "project_version", "0.2.0"),
     "persrep 0.1.0 != pyproject.toml 0.2.0"),
]

OPERATOR_MUTATIONS = [
    ("both autoscaler v2 switches", _append_env(lambda b: _head(b)["template"]["spec"]["containers"][0],
                                                {"name": "RAY_enable_autoscaler_v2", "value": "1"}),
     "both autoscalerOptions.version and head env RAY_enable_autoscaler_v2"),
    ("restartPolicy Always under v2", _set(lambda b: (_group(_cluster(b), "gpu")["template"]["spec"],
                                                      "restartPolicy"), "Always"),
     "restartPolicy must be Never or unset"),
    ("min above max", _set(lambda b: (_group(_cluster(b), "cpu-small"), "minReplicas"), 9),
     "minReplicas 9 > maxReplicas 4"),
    ("token auth on an old Ray", _set(lambda b: (_cluster(b), "rayVersion"), "2.50.0"),
     "token auth needs Ray >= 2.52.0"),
    ("resources twice", _set(lambda b: (_head(b), "resources"), {"CPU": "1"}),
     "resources set in both rayStartParams and resources"),
    ("duplicate group names", _set(lambda b: (_group(_cluster(b), "cpu-small"), "groupName"), "gpu"),
     "worker group names must be unique"),
    ("name not DNS-1035", _set(lambda b: (b.one("RayCluster")["metadata"], "name"), "Persrep_1"),
     "must be a DNS-1035 label"),
    ("RayJob name too long", _set(lambda b: (b.one("RayJob")["metadata"], "name"), "p" * 48),
     "at most 47 characters"),
    ("TTL without shutdown", _set(lambda b: (_job(b), "shutdownAfterJobFinishes"), False),
     "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"),
    ("no cluster at all", _delete(lambda b: (_job(b), "rayClusterSpec")),
     "one of rayClusterSpec or clusterSelector must be set"),
    ("runtime env not YAML", _set(lambda b: (_job(b), "runtimeEnvYAML"), "working_dir: [unclosed"),
     "runtimeEnvYAML is not valid YAML"),
]


@pytest.mark.parametrize("name,mutate,expected", POLICY_MUTATIONS + OPERATOR_MUTATIONS,
                         ids=[m[0] for m in POLICY_MUTATIONS + OPERATOR_MUTATIONS])
def test_checks_flag_mutation(bundle, name, mutate, expected):
    assert V.check(bundle) == []          # the pristine bundle is clean...
    b = bundle.copy()
    mutate(b)
    problems = V.check(b)
    assert any(expected in p for p in problems), problems   # ...and this mutation is caught


def test_mutations_do_not_leak_into_the_shared_bundle(bundle):
    b = bundle.copy()
    _head(b)["rayStartParams"]["num-cpus"] = "8"
    assert _head(bundle)["rayStartParams"]["num-cpus"] == "0"
