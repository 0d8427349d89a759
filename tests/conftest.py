"""Shared fixtures: where the real data lives, a moto S3 server on loopback, temp storage roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One thread per test process: Ray tasks run with OMP_NUM_THREADS=1, so in-process and Ray runs
# then round identically (results compared bit for bit), and tests sharing 2 cores with Ray
# workers do not oversubscribe them.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$PERSREP_SHARED_DATA`` or ``../shared/data`` beside the checkout, if present."""
    env = os.environ.get("PERSREP_SHARED_DATA")
    cand = Path(env) if env else REPO.parent / "shared" / "data"
    return cand if cand.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data not found: set PERSREP_SHARED_DATA or place shared/data beside "
                    "the checkout (../shared/data)")
    return d


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol HTTP server (moto) on loopback for the whole session.

    Yields the endpoint URL; sets fake credentials in the environment (moto accepts any).
    """
    from helpers import free_port, start_moto  # tests/ is on sys.path (this file's folder)

    port = free_port()
    server = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields its name."""
    import boto3

    name = "persrep-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-" + os.urandom(3).hex()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray cluster for the whole test run (2 CPUs, one fake GPU), ours alone.

    After ``s3_server``: Ray's workers take the driver's environment at ``ray.init``, so the moto
    endpoint and its credentials must be set by then, or a Ray test on an ``s3://`` root would
    reach for real AWS whenever no earlier test happened to start the server."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
                 log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def chromium_screenshot(tmp_path):
    """``shoot(html_path, width, height) -> RGB array`` of the page rendered by headless Chromium
    (skips when Chromium is not installed)."""
    from browser import CHROMIUM, screenshot

    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")

    def shoot(html_path: Path, width: int = 1280, height: int = 2000):
        return screenshot(Path(html_path).resolve().as_uri(), tmp_path / f"shot-{os.urandom(3).hex()}.png",
                          tmp_path / "chromium-profile", width, height)

    return shoot
