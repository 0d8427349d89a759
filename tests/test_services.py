"""Services through ``ray_jobs/run_all.py``: S3 credentials refused, the S3 endpoint going down
mid-run, the MLflow tracking server down (degraded, or a clear stop when tracking is required).

Real servers only: a moto S3 server that checks credentials (its IAM mode, in a subprocess of
its own, since moto's auth switch is process-wide and the session's S3 fixture shares this
process), a ThreadedMotoServer owned by the test (stopped and restarted mid-run), and a port
where no MLflow server answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persrep.storage import MANIFEST, Storage

sys.path.insert(0, str(Path(__file__).parent))
from helpers import error_lines, free_port, run_all_main, start_moto  # noqa: E402
from worlds import TINY  # noqa: E402

SMALL = [*TINY, "generator.types=[real_only]", "evaluation.tasks=[classification]",
         "tracking.enabled=false"]
PLANTED_SECRET = "wrong-Secret-0f9e8d7c6b5a"  # must never be printed


def _boto(endpoint: str, key: str = "AKIAIOSFODNN7EXAMPLE", secret: str = "x", service: str = "s3"):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key=secret)


# -- bad credentials ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_with_auth(tmp_path_factory):
    """A moto S3 server that authenticates requests: the first 4 actions (create an IAM user,
    its access key and policy, a bucket) are free, every later one needs valid credentials."""
    import requests

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # a cold moto/flask import on a loaded machine
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        iam = _boto(endpoint, service="iam")
        iam.create_user(UserName="persrep")
        key = iam.create_access_key(UserName="persrep")["AccessKey"]
        iam.put_user_policy(UserName="persrep", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        _boto(endpoint).create_bucket(Bucket="persrep-auth")
        yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
               "bucket": "persrep-auth"}
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_good_credentials_are_accepted_by_the_checking_server(s3_with_auth, monkeypatch):
    """The control: with the right key the same probe passes, so the refusals below are about
    the credentials, not the server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_with_auth["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_with_auth["secret"])
    Storage(f"s3://{s3_with_auth['bucket']}/ok", s3_with_auth["endpoint"]).check_writable()


@pytest.mark.parametrize("which", ["wrong_secret", "unknown_key"])
def test_bad_s3_credentials_stop_the_job_with_one_line(s3_with_auth, which, monkeypatch, capsys):
    srv = s3_with_auth
    key = srv["key"] if which == "wrong_secret" else "AKIAZZZZZZZZZZZZZZZZ"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    root = f"s3://{srv['bucket']}/{which}"
    rc = run_all_main(["--no-ray", "--storage", root, f"storage.s3_endpoint={srv['endpoint']}", *SMALL])
    out, err = capsys.readouterr()
    assert rc == 2
    [line] = error_lines(err)
    assert root in line and "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in line, line
    assert "Traceback" not in err and PLANTED_SECRET not in out + err
    # nothing was written under the root
    listed = _boto(srv["endpoint"], srv["key"], srv["secret"]).list_objects_v2(Bucket=srv["bucket"],
                                                                               Prefix=which)
    assert listed.get("KeyCount", 0) == 0


# -- the S3 endpoint goes down mid-run ---------------------------------------------------------
class OwnS3:
    """A moto S3 server owned by one test; stop() closes its socket (connections are refused),
    start() serves the same in-process state on the same port again."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        self.server = start_moto(self.port)

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # shutdown() alone keeps the port listening
            self.server = None


def test_s3_endpoint_down_mid_run_stops_clearly_then_rerun_resumes(tmp_path, monkeypatch, capsys):
    import persrep.pipeline.stages.personalization as runner

    s3 = OwnS3()
    s3.start()
    try:
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the toy world is built here, then uploaded
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        _boto(s3.endpoint).create_bucket(Bucket="persrep-down")
        root = "s3://persrep-down/run"
        argv = ["--no-ray", "--storage", root, f"storage.s3_endpoint={s3.endpoint}",
                "resources.max_retries=1", *SMALL]

        real, calls = runner.run_personalize_unit, []

        def stop_after_two(ctx, unit):
            value = real(ctx, unit)
            calls.append(unit.key)
            if len(calls) == 2:
                s3.stop()  # the endpoint dies between two units
                stopped_at.append(time.monotonic())
            return value

        stopped_at: list[float] = []
        monkeypatch.setattr(runner, "run_personalize_unit", stop_after_two)
        rc = run_all_main([*argv, "--run-id", "down"])
        stopped_in = time.monotonic() - stopped_at[0]  # from the outage to the job's exit: bounded retries
        out, err = capsys.readouterr()
        assert rc == 2
        [line] = error_lines(err)
        assert s3.endpoint in line and "up?" in line and "re-run to resume" in line, line
        assert "Traceback" not in err and "FAILED" not in out + err  # no unit blamed for it
        assert len(calls) == 2 and stopped_in < 120

        monkeypatch.setattr(runner, "run_personalize_unit", real)
        s3.start()  # the endpoint is back, with everything written before it went down
        st = Storage(root, s3.endpoint)
        finished = st.list_finished("adapters")
        assert sorted(finished) == sorted(calls)
        before = {k: st.read_bytes(f"adapters/{k}/{MANIFEST}") for k in finished}
        for k in finished:
            st.verify_unit("adapters", k)
        assert not st.exists("runs/down/summary.json")

        rc = run_all_main([*argv, "--run-id", "resumed"])
        out, err = capsys.readouterr()
        assert rc == 0, err[-2000:]
        doc = json.loads(st.read_bytes("runs/resumed/summary.json"))
        assert doc["stages"]["personalization"] == {"done": 2, "skipped": 2, "failed": 0, "retried": 0}
        assert {k: st.read_bytes(f"adapters/{k}/{MANIFEST}") for k in finished} == before
        for k in st.list_finished("adapters"):
            st.verify_unit("adapters", k)
    finally:
        s3.stop()


# -- MLflow tracking server down ---------------------------------------------------------------
def test_tracking_server_down_the_job_goes_on_degraded(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    root = tmp_path / "root"
    rc = run_all_main(["--no-ray", "--storage", str(root), "--run-id", "r", *SMALL,
                       "tracking.enabled=true", f"tracking.uri={uri}"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    said = [ln for ln in err.splitlines() if "degraded" in ln]
    assert len(said) == 1 and uri in said[0] and "tracking.enabled=false" in said[0], said
    doc = json.loads((root / "runs" / "r" / "summary.json").read_text())
    assert any(n.startswith("tracking degraded:") and uri in n for n in doc["notes"])
    assert doc["stages"]["evaluation"]["done"] == 5 and doc["failures"] == []
    assert not (root / "mlflow.db").exists()


def test_tracking_required_and_down_stops_before_compute(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    root = tmp_path / "root"
    rc = run_all_main(["--no-ray", "--storage", str(root), *SMALL, "tracking.enabled=true",
                       f"tracking.uri={uri}", "tracking.required=true"])
    out, err = capsys.readouterr()
    assert rc == 2
    [line] = error_lines(err)
    assert uri in line and "tracking.required=true" in line and "stops before compute" in line
    assert not root.exists()  # nothing computed, nothing written
