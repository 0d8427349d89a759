"""MLflow tracking against a real SQLite store: nesting, params, artifacts, secrets, degraded mode."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from persrep.config import TrackingSettings, flatten, load_settings
from persrep.redaction import REDACTED, redact_text
from persrep.tracking import (Tracker, TrackingError, mlflow_key,
                              resolve_tracking_uri)

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # shaped like an AWS secret access key
ENV_TOKEN = "tok-9f8e7d6c5b4a3"
ENDPOINT_PASSWORD = "Hunter2-S3cret"
CHILD_PASSWORD = "pl4inPassw0rd!"
URL_PASSWORD = "ChildPass99"
FILE_API_KEY = "abcd1234secretval"
JSON_TOKEN = "json-secret-123"
SECRETS = [AWS_SECRET, ENV_TOKEN, ENDPOINT_PASSWORD, CHILD_PASSWORD, URL_PASSWORD, FILE_API_KEY,
           JSON_TOKEN]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes a few seconds)."""
    root = tmp_path_factory.mktemp("storage")
    return root, f"sqlite:///{root / 'mlflow.db'}"


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _children(tracker):
    return _client(tracker.uri).search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'")


def test_parent_children_params_artifacts(store, tmp_path):
    root, _ = store
    settings = load_settings("local", [f"storage.root={root}", "tracking.experiment=nesting",
                                       "synthesis.cfg=[4,5,7.5]"])
    tracker = Tracker.from_settings(settings).connect()
    assert tracker.uri == f"sqlite:///{root / 'mlflow.db'}"  # default: <storage root>/mlflow.db
    assert not tracker.degraded
    parent = tracker.start_parent("job-1", settings, tags={"persrep.run_id": "r1"})
    assert tracker.start_parent("again") == parent  # ONE parent per job
    table = tmp_path / "results.csv"
    table.write_text("instance,value\nmug,0.5\n")
    ids = [tracker.child_run(f"inst-{i}", {"instance": f"inst-{i}", "lora": {"rank": 16}},
                             {"ap": 0.1 * i, "recall@1": 0.5}, [table],
                             references={"adapter": f"{root}/adapters/k{i}"}) for i in range(2)]
    tracker.log_results(pd.DataFrame([
        {"instance": "a", "task": "classification", "metric": "ap", "scene": "all", "value": 0.4,
         "status": "ok", "model": "personalised", "backbone": "tf_efficientnet_lite0",
         "data_config": "cut_paste"}]))
    run_dir = tmp_path / "run"
    (run_dir / "report" / "plots").mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"run_id": "r1"}')
    (run_dir / "report" / "report.html").write_text("<html></html>")
    (run_dir / "report" / "plots" / "tasks.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00fake")
    tracker.log_run_dir(run_dir)
    tracker.log_table(pd.DataFrame({"instance": ["a"], "value": [0.5]}), "results")
    tracker.end()

    client = _client(tracker.uri)
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.info.run_name == "job-1"
    flat = flatten(settings)
    assert parent_run.data.params["synthesis.cfg"] == flat["synthesis.cfg"] == "[4.0, 5.0, 7.5]"
    assert parent_run.data.params["personalization.lora.rank"] == "16"
    assert len(parent_run.data.params) == len(flat)
    assert parent_run.data.metrics["personalised/tf_efficientnet_lite0/cut_paste/classification_ap"] == 0.4
    assert {a.path for a in client.list_artifacts(parent)} == {
        "settings.json", "summary.json", "report", "tables"}
    assert {a.path for a in client.list_artifacts(parent, "report/plots")} == {"report/plots/tasks.png"}
    assert {a.path for a in client.list_artifacts(parent, "tables")} == {
        "tables/results.parquet", "tables/results.csv"}

    children = _children(tracker)
    assert sorted(r.info.run_id for r in children) == sorted(ids)
    child = client.get_run(ids[1])
    assert child.data.params == {"instance": "inst-1", "lora.rank": "16"}
    assert child.data.metrics == {"ap": 0.1, "recall_at_1": 0.5}  # '@' is not a valid MLflow name
    assert child.data.tags["persrep.ref.adapter"] == f"{root}/adapters/k1"  # by reference
    assert [a.path for a in client.list_artifacts(ids[1])] == ["results.csv"]
    local = client.download_artifacts(ids[1], "results.csv", str(tmp_path / "dl"))
    assert Path(local).read_text() == table.read_text()


def test_long_keys_and_values_fit_mlflow_limits(store):
    _, uri = store
    tracker = Tracker(TrackingSettings(uri=uri, experiment="limits")).connect()
    long_a, long_b = "k" * 300 + "a", "k" * 300 + "b"
    rid = tracker.start_parent("limits")
    tracker.log_params({long_a: "x" * 7000, long_b: 1, "weird key+with@chars": "v"})
    tracker.log_params({f"p{i}": i for i in range(150)})  # > 100 per batch
    params = _client(uri).get_run(rid).data.params
    keys = [k for k in params if k.startswith("kkk")]
    assert len(keys) == 2 and all(len(k) <= 250 for k in keys)  # truncated, still distinct
    value = params[mlflow_key(long_a)]
    assert len(value) == 6000 and "truncated" in value[-40:]
    assert params["weird key_plus_with_at_chars"] == "v"
    assert len(params) == 153
    # MLflow rejects re-logging a param with another value: that call is skipped, tracking goes on
    tracker.log_params({"p1": "changed"})
    tracker.log_metrics({"still_logging": 1.0})
    assert not tracker.degraded
    assert _client(uri).get_run(rid).data.metrics == {"still_logging": 1.0}


def test_no_secrets_in_store_or_artifacts(store, tmp_path, monkeypatch):
    root, uri = store
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("MY_SERVICE_API_TOKEN", ENV_TOKEN)
    settings = load_settings("local", [
        f"storage.root={root}", f"tracking.uri={uri}", "tracking.experiment=secrets",
        f"storage.s3_endpoint=http://persrepuser:{ENDPOINT_PASSWORD}@127.0.0.1:9000",
        f"generator.base_model=/models/{AWS_SECRET}/sd15",  # an env secret inside a setting
        f"data.path=s3://bucket/pods?token={ENV_TOKEN}"])
    tracker = Tracker.from_settings(settings).connect()
    tracker.start_parent(f"job {ENV_TOKEN}", settings, tags={"auth_header": f"Bearer {ENV_TOKEN}"})
    notes = tmp_path / "notes.txt"
    notes.write_text(f"api_key: {FILE_API_KEY}\nendpoint http://u:{URL_PASSWORD}@host/x\n"
                     f"aws {AWS_SECRET}\nplain text stays\n")
    cfg = tmp_path / "trial.json"
    cfg.write_text(json.dumps({"token": JSON_TOKEN, "lr": 0.001, "nested": {"db_password": "zz"}}))
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x00\x01binary" + AWS_SECRET.encode() + b"\x00")
    safe_blob = tmp_path / "clean.bin"
    safe_blob.write_bytes(b"\x00\x01\x02 nothing secret")
    child = tracker.child_run("trial", {"db_password": CHILD_PASSWORD,
                                        "note": f"see https://u:{URL_PASSWORD}@host/x",
                                        "lr": 0.001},
                              {"ap": 0.5}, [notes, cfg, blob, safe_blob])
    tracker.log_text(f"settings dump with {AWS_SECRET} and password={CHILD_PASSWORD}", "dump.txt")
    tracker.end()

    # what must be gone: scan every byte MLflow wrote (db, journal/WAL files, artifacts)
    written = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written)
    assert any(p.name == "notes.txt" for p in written)
    for path in written:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"secret {secret[:6]}... leaked into {path}"
    # what must stay: non-secret content, the redaction marker, parseable JSON
    client = _client(uri)
    params = client.get_run(child).data.params
    assert params["db_password"] == REDACTED and params["lr"] == "0.001"
    assert params["note"] == f"see https://{REDACTED}@host/x"
    parent_params = client.get_run(tracker.parent_run_id).data.params
    assert parent_params["storage.s3_endpoint"] == f"http://{REDACTED}@127.0.0.1:9000"
    art = {a.path for a in client.list_artifacts(child)}
    assert art == {"notes.txt", "trial.json", "clean.bin"}  # the binary holding a secret is held back
    dl = Path(client.download_artifacts(child, "", str(tmp_path / "dl")))
    assert "plain text stays" in (dl / "notes.txt").read_text()
    assert json.loads((dl / "trial.json").read_text()) == {
        "token": REDACTED, "lr": 0.001, "nested": {"db_password": REDACTED}}


def test_redact_text_patterns(monkeypatch):
    monkeypatch.setenv("SOME_PASSWORD", "correct-horse-battery")
    text = ("x correct-horse-battery y; AKIAIOSFODNN7EXAMPLE; s3://k:v@b/p; "
            "commit 0123456789abcdef0123456789abcdef01234567; tokenizer_path=/tmp/a")
    out = redact_text(text)
    assert "correct-horse-battery" not in out and "AKIAIOSFODNN7EXAMPLE" not in out
    assert "k:v@" not in out and f"s3://{REDACTED}@b/p" in out
    assert "0123456789abcdef0123456789abcdef01234567" in out  # a lowercase hex digest is no secret


def test_degraded_when_server_unreachable(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="persrep.tracking")
    tracker = Tracker(TrackingSettings(uri="http://127.0.0.1:9"), str(tmp_path)).connect()
    assert tracker.degraded and not tracker.active
    # the job goes on: every call is a no-op, nothing to wire into Ray Tune
    assert tracker.start_parent("job") is None
    assert tracker.child_run("c", {"a": 1}, {"m": 1.0}) is None
    tracker.log_metrics({"m": 1.0})
    tracker.end()
    assert tracker.parent_run_tags() == {} and tracker.tune_callback_kwargs() is None
    lines = [r.getMessage() for r in caplog.records if r.name == "persrep.tracking"]
    assert len(lines) == 1, lines  # ONE warning line ...
    assert "http://127.0.0.1:9" in lines[0] and "tracking.enabled=false" in lines[0]  # URI + fix
    assert "\n" not in lines[0] and "degraded" in lines[0]


def test_required_tracking_raises_before_compute():
    tracker = Tracker(TrackingSettings(uri="http://127.0.0.1:9", required=True))
    with pytest.raises(TrackingError, match=r"127\.0\.0\.1:9.*tracking.required=true"):
        tracker.connect()


def test_file_store_is_refused_clearly(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="sqlite:///"):
        Tracker(TrackingSettings(uri=str(tmp_path / "mlruns"), required=True)).connect()


def test_disabled_tracker_touches_nothing(tmp_path):
    tracker = Tracker(TrackingSettings(enabled=False), str(tmp_path)).connect()
    assert tracker.start_parent("x") is None and tracker.child_run("c") is None
    assert not tracker.degraded and list(tmp_path.iterdir()) == []


def test_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, str(tmp_path)) == (f"sqlite:///{tmp_path}/mlflow.db", None)
    assert resolve_tracking_uri("http://mlflow:5000", str(tmp_path))[0] == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert resolve_tracking_uri(None, str(tmp_path))[0] == "http://env-host:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    uri, note = resolve_tracking_uri(None, "s3://bucket/prefix")
    assert uri == f"sqlite:///{tmp_path / 'home' / '.persrep' / 'mlflow.db'}"
    assert note and "s3://bucket/prefix" in note and "tracking.uri" in note
    # a relative SQLite path is fixed on the driver, against the directory the job started in
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///sub/m.db", None)[0] == f"sqlite:///{tmp_path}/sub/m.db"
    assert resolve_tracking_uri("sqlite:///m.db?timeout=20", None)[0] == f"sqlite:///{tmp_path}/m.db?timeout=20"
    assert resolve_tracking_uri("sqlite:////abs/m.db", None)[0] == "sqlite:////abs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None, None)[0] == f"sqlite:///{tmp_path}/env.db"


def test_retries_while_database_is_locked(monkeypatch):
    import persrep.tracking.tracker as tr

    monkeypatch.setattr(tr.time, "sleep", lambda s: None)
    tracker = Tracker(TrackingSettings(enabled=False))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"
    assert tracker._call(flaky) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise ValueError("no such table")
    calls.clear()
    with pytest.raises(ValueError):
        tracker._call(broken)
    assert len(calls) == 1  # other errors are not retried


def test_ray_tune_callback_nests_trials(store):
    """The real Ray Tune MLflowLoggerCallback, fed our kwargs, logs trials under the parent."""
    mlflow_cb = pytest.importorskip("ray.air.integrations.mlflow")
    _, uri = store
    tracker = Tracker(TrackingSettings(uri=uri, experiment="tune")).connect()
    assert tracker.tune_callback_kwargs() is None  # no parent yet: nothing to nest under
    parent = tracker.start_parent("sweep")
    kwargs = tracker.tune_callback_kwargs()
    assert kwargs["tags"] == {"mlflow.parentRunId": parent} == tracker.parent_run_tags()

    class FakeTrial:  # what the callback reads from a Tune trial
        config = {"cfg": 5.0, "lr": 3e-4}
        local_path = None

        def __str__(self):
            return "trial_00000"

    cb = mlflow_cb.MLflowLoggerCallback(**kwargs)
    cb.setup()
    trial = FakeTrial()
    cb.log_trial_start(trial)
    cb.log_trial_result(1, trial, {"training_iteration": 1, "ap": 0.42})
    cb.log_trial_end(trial)
    runs = _children(tracker)
    assert [r.info.run_name for r in runs] == ["trial_00000"]
    assert runs[0].data.metrics["ap"] == 0.42 and runs[0].data.params["cfg"] == "5.0"


def test_imports_stay_light():
    code = ("import sys, persrep.tracking, persrep.report; "
            "print(sorted(m for m in ('mlflow', 'matplotlib', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_numbers_under_secret_looking_keys_are_kept():
    """``synthesis.captions.max_new_tokens`` is a count: a run's settings.yaml must load back."""
    from persrep.redaction import redact_obj, redact_value

    assert redact_obj({"max_new_tokens": 48, "api_token": "abcd1234"}, env_values=[]) == \
        {"max_new_tokens": 48, "api_token": "***"}
    assert redact_value("max_new_tokens", 48) == 48
