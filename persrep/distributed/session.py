"""Attach to a running Ray cluster, or start a local one: the one place that calls ``ray.init``.

Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) Ray attaches to that cluster. Otherwise a
local cluster is started for this process, sized from the settings (default: every core), and
shut down by :func:`release` when the job ends. Never ``ray stop``: other clusters may share the
machine.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from persrep.config import ConfigError, ResourcesSettings


def cluster_address() -> str | None:
    """``$RAY_ADDRESS`` when set (the cluster to attach to), checked: a dashboard URL is refused
    in one line. The job calls this before any work, since it starts Ray only when a unit is left
    to compute."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):  # what the `ray job` CLI wants, not ray.init
        raise ConfigError(f"RAY_ADDRESS={address} is a dashboard (job submission) address, not a "
                          "cluster address: submit with `ray job submit --address "
                          f"{address} -- python ray_jobs/run_all.py ...`, or set RAY_ADDRESS to "
                          "the head's GCS address host:port (e.g. 127.0.0.1:6379) to attach")
    return address or None


def ensure_ray(resources: ResourcesSettings | None = None, **init_kwargs: Any) -> bool:
    """Initialise Ray if needed. Returns True when this call started a local cluster."""
    if ray.is_initialized():
        return False
    address = cluster_address()
    if address:
        ray.init(address=address, log_to_driver=True, **init_kwargs)
        return False
    # address="local": always a new cluster of our own, never one another user started here
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False, "log_to_driver": True}
    if resources is not None and resources.num_cpus:
        kwargs["num_cpus"] = resources.num_cpus
    if resources is not None and resources.num_gpus is not None:
        kwargs["num_gpus"] = resources.num_gpus
    kwargs.update(init_kwargs)
    ray.init(**kwargs)
    from persrep.interrupt import reinstall

    reinstall()  # a local node sets Ray's own SIGTERM handler; a job's clean stop needs ours
    return True


def release(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def node_shapes() -> list[Any]:
    """The alive nodes' CPUs, GPUs and the memory Ray offers to tasks and actors there."""
    from persrep.pipeline.memory import GIB, NodeShape

    return [NodeShape(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)),
                      float(n["Resources"].get("memory", 0)) / GIB)
            for n in ray.nodes() if n.get("Alive")]
