"""``train_one_instance``: LoRA + InfoNCE personalisation of one backbone for one instance.

Plain PyTorch: no Ray here (the Tune stage in ``persrep.distributed`` calls this function).

Determinism and resume: the triplets are a pure function of the seed; batch order per epoch is
a seeded permutation; before each step the global torch RNG is re-seeded from (seed, step), so
augmentation and LoRA dropout depend only on the step number. A run resumed from its last
checkpoint therefore ends with exactly the weights of an uninterrupted run (CPU). Checkpoints
hold only tensors and plain values and are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from persrep.compositing import mask_box_crop
from persrep.config import BackboneSettings, PersonalizationSettings, content_key
from persrep.contrastive.hard_negatives import context_crops, recoloured, unlike_the_object
from persrep.contrastive.losses import build_loss, triplet_accuracy
from persrep.contrastive.triplets import sample_triplets
from persrep.hashing import stable_seed
from persrep.models.backbones import build_backbone, eval_transform, train_transform
from persrep.models.lora import apply_lora, lora_parameters, lora_state_dict, save_adapter

ImageLike = Image.Image | bytes
CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter.safetensors"


@dataclass
class TrainingData:
    """An instance's training images: real anchors, positives (synthetic or real), negatives."""

    instance: str
    anchors: list[ImageLike]
    positives: list[ImageLike]
    negatives: list[ImageLike]
    positives_source: str = "synthetic"  # synthetic | real (real-only) | real_only_fallback (verdict.py)
    negatives_source: str = "generated"  # generated | external | in_pool
    anchor_masks: list[Image.Image | None] | None = None  # the anchors' masks (context negatives)

    def key(self) -> str:
        """Identity of the data, by content (the pipeline passes shard keys instead when it has them)."""
        fp = [_fingerprint(x) for x in (*self.anchors, *self.positives, *self.negatives)]
        if self.anchor_masks is not None:  # they make the context negatives
            fp += [_fingerprint(m) if m is not None else "-" for m in self.anchor_masks]
        return content_key(self.instance, len(self.anchors), len(self.positives), fp)


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    seconds: float
    resumed_from: int
    metrics: dict[str, Any] = field(default_factory=dict)


def _fingerprint(x: ImageLike) -> str:
    data = x if isinstance(x, bytes) else x.tobytes()
    return content_key(len(data), data[:4096].hex(), data[-4096:].hex(), length=12)


def _to_pil(x: ImageLike) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    return Image.open(io.BytesIO(x)).convert("RGB")


def total_steps(pz: PersonalizationSettings) -> int:
    per_epoch = math.ceil(pz.num_triplets / pz.batch_size)
    steps = per_epoch * pz.epochs
    return min(steps, pz.max_steps) if pz.max_steps else steps


def batch_indices(pz: PersonalizationSettings, step: int) -> np.ndarray:
    """Triplet indices of optimiser step ``step`` (0-based): a seeded permutation per epoch."""
    per_epoch = math.ceil(pz.num_triplets / pz.batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([pz.seed, epoch, 0xBA7C]).permutation(pz.num_triplets)
    return order[pos * pz.batch_size:(pos + 1) * pz.batch_size]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    # from torch, never from Ray: fake GPUs in tests set CUDA_VISIBLE_DEVICES without a device
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (a partial file, then a rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


@dataclass
class TrainingSetup:
    """Everything a training loop starts from; shared by ``train_one_instance`` and the
    data-parallel trainer, so both draw the same triplets and start from the same weights."""

    run_key: str
    backbone: Any
    optim: torch.optim.Optimizer
    loss_fn: Any
    augment: Any
    triplets: list[tuple[int, int, int]]
    anchors: list[Image.Image]
    positives: list[Image.Image]
    negatives: list[Image.Image]
    positives_source: str = "synthetic"  # data.positives_source, "synthetic+real" when real photos are mixed in
    own_negatives: dict[str, int] = field(default_factory=dict)  # negatives made from the instance's images

    @classmethod
    def build(cls, pz: PersonalizationSettings, backbone_settings: BackboneSettings,
              data: TrainingData, device: torch.device) -> "TrainingSetup":
        run_key = content_key(pz, backbone_settings, data.key())  # checkpoints carry it
        torch.manual_seed(pz.seed)
        backbone = apply_lora(build_backbone(backbone_settings), pz.lora).to(device)
        if pz.channels_last and not backbone.is_token_model:  # CNN convs: faster on CPU (measured)
            backbone = backbone.to(memory_format=torch.channels_last)
        optim = torch.optim.Adam(lora_parameters(backbone), lr=pz.learning_rate,
                                 betas=tuple(pz.betas), weight_decay=pz.weight_decay)
        anchors = [_to_pil(x) for x in data.anchors]
        positives = [_to_pil(x) for x in data.positives] if data.positives else anchors
        # identity-destroying edits of the instance's own images (contrastive/hard_negatives.py)
        hn = pz.hard_negatives
        edits = recoloured(anchors + (positives if positives is not anchors else []), hn.recolour,
                           hn.min_hue_shift, pz.seed)
        context = _context_negatives(backbone, backbone_settings, anchors, data, hn.context, pz.seed)
        negatives = [_to_pil(x) for x in data.negatives] + edits + context
        # real-only positives are the few real photos: num_positives (a synthetic-pool size) caps nothing
        synthetic = data.positives_source == "synthetic"
        n_pos = len(data.positives) if not synthetic else pz.num_positives
        triplets = sample_triplets(list(range(len(data.anchors))), list(range(len(data.positives))),
                                   list(range(len(negatives))), pz.num_triplets, n_pos, pz.seed)
        source = data.positives_source
        if synthetic and pz.real_positive_share > 0:  # some positives are the real photos themselves
            triplets = _mix_real_positives(triplets, len(positives), len(anchors),
                                           pz.real_positive_share, pz.seed)
            positives, source = positives + anchors, "synthetic+real"
        return cls(run_key, backbone, optim, build_loss(pz.loss, pz.temperature),
                   train_transform(backbone_settings, scale=tuple(pz.crop_scale)), triplets, anchors,
                   positives, negatives, source, {"recoloured": len(edits), "context": len(context)})

    def restore(self, state: dict[str, Any] | None) -> tuple[int, dict[str, list[float]]]:
        """Load a checkpoint's state when it belongs to this run (same run key): the step to start
        from and the history so far; (0, empty) otherwise."""
        if state is None or state.get("run_key") != self.run_key:
            return 0, {"loss": [], "accuracy": []}
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.backbone.model, state["lora"])
        self.optim.load_state_dict(state["optim"])
        return int(state["step"]), state["history"]

    def checkpoint(self, step: int, history: dict[str, list[float]]) -> dict[str, Any]:
        """The state a checkpoint holds after ``step`` steps (tensors and plain values only)."""
        return {"run_key": self.run_key, "step": step,
                "lora": {k: v.detach().cpu() for k, v in lora_state_dict(self.backbone).items()},
                "optim": self.optim.state_dict(), "history": history}

    def metrics(self, data: TrainingData, history: dict[str, list[float]], start: int, seconds: float,
                finished: bool) -> dict[str, Any]:
        """The final metrics an adapter is published with (without the loss history)."""
        losses = history["loss"]
        k = max(1, min(10, len(losses) // 4))
        return {"final_loss": float(np.mean(losses[-k:])) if losses else float("nan"),
                "initial_loss": float(np.mean(losses[:k])) if losses else float("nan"),
                "final_triplet_accuracy": float(np.mean(history["accuracy"][-k:])) if losses else float("nan"),
                "steps_per_s": (len(losses) - start) / seconds if seconds > 0 else float("nan"),
                "finished": finished, "num_anchors": len(self.anchors), "num_positives": len(data.positives),
                "num_negatives": len(self.negatives),
                "num_recoloured_negatives": self.own_negatives.get("recoloured", 0),
                "num_context_negatives": self.own_negatives.get("context", 0),
                "positives_source": self.positives_source,
                "negatives_source": data.negatives_source}


def _context_negatives(backbone: Any, settings: BackboneSettings, anchors: list[Image.Image],
                       data: TrainingData, count: int, seed: int) -> list[Image.Image]:
    """Up to ``count`` crops of the anchors' surroundings (contrastive/hard_negatives.py), less those the
    starting model sees as the object itself (``unlike_the_object``: more of the same fruit in
    the bin, the product's other facings on the shelf): a negative must not be the instance."""
    masks = data.anchor_masks or [None] * len(anchors)
    crops = context_crops(anchors, masks, count, seed)
    objects = [mask_box_crop(a, m) for a, m in zip(anchors, masks) if m is not None and m.getbbox()]
    if not crops or not objects:
        return []
    rng = np.random.default_rng([seed, 0x0B1])
    unrelated = [_to_pil(data.negatives[i]) for i in
                 sorted(rng.permutation(len(data.negatives))[:64])] if data.negatives else []
    keep = unlike_the_object(*(_embed(backbone, settings, x) for x in (objects, crops, unrelated)))
    return [c for c, k in zip(crops, keep) if k]


@torch.no_grad()
def _embed(backbone: Any, settings: BackboneSettings, images: list[Image.Image]) -> np.ndarray:
    """L2-normalised global features of ``images`` (evaluation transform), in float64."""
    if not images:
        return np.zeros((0, 1))
    was_training = backbone.training
    backbone.eval()
    tf = eval_transform(settings)
    dev = next(backbone.parameters()).device
    feats = [backbone.global_features(torch.stack([tf(i) for i in images[k:k + 32]]).to(dev), "cls")
             for k in range(0, len(images), 32)]
    backbone.train(was_training)
    f = torch.cat(feats).double()
    return torch.nn.functional.normalize(f, dim=1).cpu().numpy()


def _mix_real_positives(triplets: list[tuple[int, int, int]], n_synthetic: int, n_real: int,
                        share: float, seed: int) -> list[tuple[int, int, int]]:
    """Replace the positive of a seeded ``share`` of the triplets by a real photo (index
    ``n_synthetic + i`` in the positives list extended by the anchors)."""
    rng = np.random.default_rng([seed, 0x2EA1])
    real = rng.random(len(triplets)) < share
    picks = rng.integers(0, n_real, len(triplets))
    return [(a, n_synthetic + int(r) if use else p, n)
            for (a, p, n), use, r in zip(triplets, real, picks)]


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any] | None:
    """A checkpoint file's state (``weights_only``), or None when there is none."""
    return torch.load(path, map_location=device, weights_only=True) if path.exists() else None


def train_one_instance(pz: PersonalizationSettings, backbone_settings: BackboneSettings,
                       data: TrainingData, work_dir: str | Path, *,
                       progress: Callable[[dict[str, Any]], None] | None = None,
                       device: str | torch.device | None = None,
                       stop_after: int | None = None) -> TrainResult:
    """Personalise ``backbone_settings`` on ``data``; write the adapter under ``work_dir``.

    ``stop_after`` ends the run early after that many steps *of this call* (tests use it to
    simulate a crash; the checkpoint written at that point lets a re-run resume).
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    setup = TrainingSetup.build(pz, backbone_settings, data, dev)
    backbone, optim, loss_fn, augment = setup.backbone, setup.optim, setup.loss_fn, setup.augment
    triplets, anchors, positives, negatives = setup.triplets, setup.anchors, setup.positives, setup.negatives
    n_steps = total_steps(pz)

    ckpt_path = work / CHECKPOINT
    start, history = setup.restore(load_checkpoint(ckpt_path, dev))
    use_amp = dev.type == "cuda"
    backbone.train()
    t0 = time.perf_counter()
    for step in range(start, n_steps):
        if stop_after is not None and step - start >= stop_after:
            break
        torch.manual_seed(stable_seed("train-step", pz.seed, step))
        idx = batch_indices(pz, step)
        a = torch.stack([augment(anchors[triplets[i][0]]) for i in idx])
        p = torch.stack([augment(positives[triplets[i][1]]) for i in idx])
        n = torch.stack([augment(negatives[triplets[i][2]]) for i in idx])
        x = torch.cat([a, p, n]).to(dev)
        if pz.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            emb = backbone.global_features(x, pz.feature).float()
        ea, ep, en = emb.split(len(idx))
        loss = loss_fn(ea, ep, en)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        acc = triplet_accuracy(ea, ep, en)
        history["loss"].append(float(loss.item()))
        history["accuracy"].append(acc)
        done = step + 1
        saved = done % pz.checkpoint_every == 0 or done == n_steps
        if saved:
            save_checkpoint(ckpt_path, setup.checkpoint(done, history))
        if progress:  # after the checkpoint, so a caller sees each checkpoint at its own step
            progress({"instance": data.instance, "step": done, "steps": n_steps,
                      "loss": float(loss.item()), "triplet_accuracy": acc,
                      "checkpoint": str(ckpt_path) if saved else None})
    finished = len(history["loss"]) >= n_steps
    seconds = time.perf_counter() - t0
    adapter = work / ADAPTER
    if finished:
        save_adapter(backbone.cpu(), adapter)
    losses = history["loss"]
    metrics = {**setup.metrics(data, history, start, seconds, finished), "loss_history": losses}
    return TrainResult(adapter if finished else work / "unfinished", len(losses), seconds, start, metrics)


def personalised_backbone(backbone_settings: BackboneSettings, adapter_path: str | Path) -> Any:
    """A fresh base with the adapter loaded (eval mode): what evaluation embeds with."""
    from persrep.models.lora import load_adapter

    return load_adapter(build_backbone(backbone_settings), adapter_path)

