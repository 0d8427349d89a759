"""One large personalisation job, data-parallel over several workers (Ray Train V2 ``TorchTrainer``).

For a backbone too slow for one GPU (ViT-B at 224 px, thousands of triplets) the unit's global
batch is split over ``num_workers`` processes, DDP all-reduces the gradients of the LoRA
parameters (the only trainable ones; the frozen base is never synchronised), and rank 0 publishes
the adapter exactly as :func:`persrep.pipeline.stages.personalization.run_personalize_unit` does (same files, same
metadata), so evaluation cannot tell the two apart.

Same optimisation problem as :func:`persrep.contrastive.train.train_one_instance`, not an
approximation of it:

* the InfoNCE loss couples the whole batch (every anchor sees every positive and negative of the
  batch), so each rank embeds its shard, all-gathers the embeddings (its own shard keeps its
  graph) and computes the *full-batch* loss; the sum over ranks of the shard gradients is the
  full-batch gradient, hence ``(loss * world_size).backward()`` under DDP's averaging;
* the batches, the per-step RNG seeding and the augmentation draws are those of
  ``train_one_instance`` (every rank augments the whole batch in the same order and keeps its
  shard), the initial LoRA weights come from the same seed; BatchNorm is frozen (eval mode), so a
  sample's embedding does not depend on its shard;
* hence with ``lora.dropout=0`` the adapter equals single-process training up to floating-point
  summation order (tested); with dropout the masks are drawn per shard (statistically the same).

Checkpoints have ``train_one_instance``'s format (rank 0 reports them with ``ray.train.report``);
relaunching with the same (storage_path, name) resumes from the latest one (Train V2 semantics),
and ``FailureConfig(max_failures)`` restarts the worker group from it after a worker failure.
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persrep.contrastive.losses import triplet_accuracy
from persrep.contrastive.train import ADAPTER, CHECKPOINT, batch_indices, load_checkpoint, total_steps
from persrep.pipeline.stages.personalization import PersonalizeUnit, publish_adapter, training_data
from persrep.pipeline.units import ADAPTERS


def shard_positions(batch: int, world: int) -> list[np.ndarray]:
    """Contiguous, near-equal shards of a batch's positions (a rank may get none)."""
    return np.array_split(np.arange(batch), world)


def _gather_full(local: Any, sizes: Sequence[int], rank: int) -> Any:
    """All-gather (3, k_r, d) shards into (3, sum k_r, d); only the own shard keeps its graph."""
    import torch
    import torch.distributed as dist

    width = max(sizes)
    pad = width - local.shape[1]
    padded = torch.cat([local, local.new_zeros(local.shape[0], pad, local.shape[2])], 1) if pad else local
    bufs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(bufs, padded.detach().contiguous())
    parts = [local if r == rank else bufs[r][:, :k] for r, k in enumerate(sizes)]
    return torch.cat(parts, 1)


def _train_loop(config: dict[str, Any]) -> None:  # runs in every Ray Train worker
    import ray.train
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from persrep.contrastive.train import TrainingSetup, save_checkpoint
    from persrep.hashing import stable_seed
    from persrep.models.lora import save_adapter

    ctx, unit = config["ctx"], config["unit"]
    pz, bs = ctx.settings.personalization, unit.backbone
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    dev = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")

    data = training_data(ctx, unit)
    # the same setup as train_one_instance (same run key, so checkpoints interchange)
    setup = TrainingSetup.build(pz, bs, data, dev)
    backbone, optim, loss_fn, augment = setup.backbone, setup.optim, setup.loss_fn, setup.augment
    triplets, anchors, positives, negatives = setup.triplets, setup.anchors, setup.positives, setup.negatives
    n_steps = total_steps(pz)

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT, dev)
    start, history = setup.restore(state)  # train_one_instance's restore: same run key, same state

    class Embed(nn.Module):  # DDP hooks forward(); the backbone's feature is a method
        def __init__(self, b: nn.Module):
            super().__init__()
            self.b = b

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b.global_features(x, pz.feature)

    backbone.train()  # frozen BatchNorm stays in eval mode (persrep.models.lora)
    # frozen BatchNorm: buffers are identical on every rank and never change; don't sync them
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
            inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    model = DistributedDataParallel(Embed(backbone), device_ids=[dev.index] if dev.type == "cuda" else None,
                                    **sync)
    use_amp = dev.type == "cuda"
    every = max(1, int(config.get("report_every") or pz.checkpoint_every))
    t0 = time.perf_counter()
    for step in range(start, n_steps):
        torch.manual_seed(stable_seed("train-step", pz.seed, step))
        idx = batch_indices(pz, step)
        # the whole batch's augmentations, in train_one_instance's order; keep this rank's shard
        a = [augment(anchors[triplets[i][0]]) for i in idx]
        p = [augment(positives[triplets[i][1]]) for i in idx]
        n = [augment(negatives[triplets[i][2]]) for i in idx]
        shards_ = shard_positions(len(idx), world)
        sizes = [len(s) for s in shards_]
        mine = shards_[rank]
        if len(mine):
            x = torch.stack([a[j] for j in mine] + [p[j] for j in mine] + [n[j] for j in mine])
        else:  # an empty shard still runs forward/backward (DDP needs every rank), with no weight
            x = a[0].unsqueeze(0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            emb = model(x.to(dev)).float()
        local = emb.reshape(3, len(mine), emb.shape[1]) if len(mine) else \
            (emb * 0)[:0].reshape(3, 0, emb.shape[1])
        full = _gather_full(local, sizes, rank)
        ea, ep, en = full[0], full[1], full[2]
        loss = loss_fn(ea, ep, en)
        optim.zero_grad(set_to_none=True)
        (loss * world).backward()  # DDP averages over ranks; the shards' gradients must add up
        optim.step()
        acc = triplet_accuracy(ea, ep, en)
        history["loss"].append(float(loss.item()))
        history["accuracy"].append(acc)
        done = step + 1
        save = done % pz.checkpoint_every == 0 or done == n_steps
        if save or done % every == 0:
            metrics = {"loss": float(loss.item()), "triplet_accuracy": acc, "step": done, "steps": n_steps}
            with tempfile.TemporaryDirectory(prefix="persrep-dp-") as d:
                checkpoint = None
                if save and rank == 0:
                    save_checkpoint(Path(d) / CHECKPOINT, setup.checkpoint(done, history))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)  # a barrier for all ranks
        if config.get("fail_at_step") == done and rank == world - 1 and not Path(config["fail_marker"]).exists():
            Path(config["fail_marker"]).write_text(str(done))  # fault injection (tests)
            raise RuntimeError(f"injected worker failure at step {done}")
    seconds = time.perf_counter() - t0
    if rank != 0:
        return
    metrics = {**setup.metrics(data, history, start, seconds, True), "data_parallel_workers": world}
    with tempfile.TemporaryDirectory(prefix="persrep-dp-") as d:
        path = Path(d) / ADAPTER
        save_adapter(backbone.cpu(), path)
        publish_adapter(ctx, unit, path.read_bytes(), metrics, history["loss"], seconds, start)


@dataclass(frozen=True)
class DataParallel:
    """How one unit trains data-parallel: ``num_workers`` Ray Train workers (one GPU each with
    ``use_gpu``, else ``cpus_per_worker`` CPUs), the Train run's ``name`` (default ``dp-<unit
    key>``: a relaunch resumes) and storage (default: the Tune storage of the run), its
    ``max_failures`` (default ``resources.max_retries``), ``callbacks`` (inside a Tune trial:
    ``ray.tune.integration.ray_train.TuneReportCallback()``) and ``report_every``."""

    num_workers: int
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    name: str | None = None
    storage_path: str | None = None
    storage_filesystem: Any = None
    max_failures: int | None = None
    callbacks: Sequence[Any] = ()
    report_every: int | None = None


def train_data_parallel(ctx: Any, unit: PersonalizeUnit, how: DataParallel,
                        _fault: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and publish one unit data-parallel (``how``); the unit's outcome dict.

    Skips a published unit. Call from a driver with Ray initialised, or from inside a Tune trial.
    """
    num_workers, use_gpu, cpus_per_worker = how.num_workers, how.use_gpu, how.cpus_per_worker
    storage_path, storage_filesystem = how.storage_path, how.storage_filesystem
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from persrep.distributed.tune_common import tune_storage

    if ctx.storage.is_finished(ADAPTERS, unit.key):
        return {"status": "skipped", "key": unit.key}
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: need at least 1")
    if storage_path is None:
        storage_path, storage_filesystem = tune_storage(ctx)
    res = ctx.settings.resources
    per_worker: dict[str, float] = {"CPU": cpus_per_worker or (res.cpus_per_trial if use_gpu else
                                                               res.cpus_per_actor)}
    if use_gpu:
        per_worker["GPU"] = 1.0
    config = {"ctx": ctx, "unit": unit, "use_gpu": use_gpu, "report_every": how.report_every, **(_fault or {})}
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=how.name or f"dp-{unit.key}", storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(
                max_failures=res.max_retries if how.max_failures is None else how.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=list(how.callbacks)))
    result = trainer.fit()
    meta = ctx.storage.verify_unit(ADAPTERS, unit.key).meta
    value = {"status": "done", "key": unit.key, "seconds": meta.get("seconds", time.perf_counter() - t0),
             **meta.get("metrics", {}), "resumed_from": meta.get("resumed_from", 0)}
    if result.metrics:
        value["last_reported_step"] = result.metrics.get("step")
    return {k: v for k, v in value.items() if not (isinstance(v, float) and math.isnan(v))}
