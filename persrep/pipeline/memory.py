"""How much host memory each heavy unit needs, so the scheduler, not the OOM killer, decides.

Every heavy unit (generator prep, a synthesis actor, a personalisation trial, an evaluation)
reserves Ray's ``memory`` resource (bytes of host RAM) from an estimate made here on the driver,
before compute; ``resources.memory_gb.<stage>`` overrides it. Ray then starts only as many units
on a node as fit in its memory, and a unit that fits on no node fails in one line before any work.

The estimate is arithmetic on the models' real sizes: parameter counts come from building each
architecture on PyTorch's ``meta`` device (no weights, no memory, about a second for SD 1.5), and
activation sizes from one ``meta`` forward pass of the backbone at the configured resolution
(the sum of every leaf module's output: what autograd keeps for the backward pass). Then:

=================  ==========================================================================
generator prep     the largest ``prep_memory`` of the configured types that train (the generator
                   class's method, from its own section); DreamBooth's: weights (fp32, UNet + text encoder + VAE) + gradients and AdamW state (4 + 8
                   bytes per trained parameter; LoRA: ~1 % of the UNet) + UNet activations
                   (calibrated on SD 1.5: 2.5 GB per 512 px image with gradient checkpointing,
                   10 GB without, scaled by resolution^2, batch, prior preservation and UNet size)
synthesis actor    ``cache_size`` (2) loaded generators' weights + inference activations
                   (0.6 GB per 512 px image x 2 for classifier-free guidance, scaled likewise)
personalisation    backbone weights + activations of batch x 3 images (anchor, positive, negative)
evaluation         backbone weights + one dense input's forward + a batch at the global size
every process      1.2 GB (Python, torch, Ray worker, diffusers / timm imports; measured 1.1 GB)
=================  ==========================================================================

On GPU nodes the host only stages the weights (fp32 load) before moving them; the GPU-side
figure is reported in the plan for information (GPU sharing is ``resources.gpus_per_trial``, and
``resources.gpus_per_tune_trial`` for personalisation trials, which the plan counts per GPU).
Checked against measurements (``bench/dreambooth_memory.py`` -> ``bench/dreambooth_memory.json``: full
DreamBooth on CPU at SD 1.5's architecture and at narrower UNets): the estimate is 3-10 % above the
measured peak, which is the training step since the optimizer state is freed before the weights are
serialised (holding both made serialisation the peak, ~4 GiB above the step at SD 1.5 size). Deliberately simple: when it is wrong for a
model, ``resources.memory_gb`` is the fix, and docs/SCALING.md records measured figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from persrep.errors import InsufficientResourcesError  # noqa: F401 (re-exported)

GIB = 1024 ** 3
PROCESS_GB = 1.2  # an idle worker process after the heavy imports
SD15_PARAMS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}  # fallback
STAGES = ("generator_prep", "synthesis", "personalization", "evaluation")
OVERCOMMIT = 1.5  # an estimate up to this much above the largest node's Ray memory runs alone there


@dataclass
class Estimate:
    stage: str
    gb: float  # host memory one unit reserves
    parts: dict[str, float] = field(default_factory=dict)  # GB by component
    basis: str = "estimate"  # "estimate" | "resources.memory_gb" | "whole node"
    gpu_gb: float | None = None  # on a GPU: device memory the unit needs (information)
    sized_by: str | None = None  # the settings that size it (else SIZE_SETTINGS[stage])

    @property
    def bytes(self) -> int:
        return int(self.gb * GIB)

    def describe(self) -> str:
        parts = " + ".join(f"{k} {v:.1f}" for k, v in self.parts.items() if v >= 0.05)
        if self.basis == "whole node":
            return (f"{self.gb:.1f} GiB, the whole node (estimate {sum(self.parts.values()):.1f} GiB: {parts}; "
                    "more than Ray offers there, so it runs alone)")
        if self.basis != "estimate":
            return f"{self.gb:.1f} GiB ({self.basis}.{self.stage})"
        return f"{self.gb:.1f} GiB (estimate: {parts})"


# ---------------------------------------------------------------------------------------------
# sizes of the real architectures, without weights
def _count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


@lru_cache(maxsize=8)
def diffusion_params(base_model: str) -> dict[str, int]:
    """Parameter counts of the diffusion model's UNet, text encoder and VAE."""
    import json
    from pathlib import Path

    import torch

    from persrep.models.diffusion import TINY, _looks_like_path

    if base_model == TINY:
        from persrep.models.diffusion import tiny_components

        c = tiny_components()
        return {"unet": _count(c.unet), "text_encoder": _count(c.text_encoder), "vae": _count(c.vae)}
    root = Path(base_model).expanduser() if _looks_like_path(base_model) else _hub_snapshot(base_model)
    if root is None or not (root / "unet" / "config.json").is_file():
        return dict(SD15_PARAMS)  # configs not at hand: the paper's model
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def cfg(sub: str) -> dict[str, Any]:
        return json.loads((root / sub / "config.json").read_text())

    with torch.device("meta"):
        return {"unet": _count(UNet2DConditionModel.from_config(cfg("unet"))),
                "text_encoder": _count(CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))),
                "vae": _count(AutoencoderKL.from_config(cfg("vae")))}


def _hub_snapshot(model_id: str):
    from pathlib import Path

    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model_id, "unet/config.json")
    except Exception:  # noqa: BLE001 - no cache, odd id: fall back to the paper's sizes
        return None
    return Path(hit).parent.parent if isinstance(hit, str) else None


@lru_cache(maxsize=16)
def backbone_size(name: str, weights: str, image_size: int) -> tuple[int, int]:
    """(parameters, activation elements of one image's forward pass) of a timm backbone."""
    import timm
    import torch

    from persrep.models.backbones import _TINY_VIT, _is_token_arch

    kwargs: dict[str, Any] = {"num_classes": 0}
    if _is_token_arch(name):
        kwargs["dynamic_img_size"] = True
        if weights == "tiny":
            kwargs.update(_TINY_VIT)
    arch = name.split(".")[0] if weights == "offline" else name
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    params = _count(model)
    total = [0]

    def hook(_m, _i, out):
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel()

    # leaves that make new tensors (Identity / Dropout return their input: nothing new is kept)
    leaves = [m for m in model.modules() if not list(m.children())
              and not isinstance(m, (torch.nn.Identity, torch.nn.Dropout))]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
        acts = total[0]
    except Exception:  # noqa: BLE001 - an op without a meta kernel: a rough per-pixel figure
        acts = int(400 * image_size * image_size)
    finally:
        for h in handles:
            h.remove()
    return params, acts


# ---------------------------------------------------------------------------------------------
# per-stage estimates
def estimate_stage(settings: Any, stage: str, on_gpu: bool = False, cache_size: int = 2) -> Estimate:
    """The memory one unit of ``stage`` reserves (override: ``resources.memory_gb.<stage>``)."""
    override = getattr(settings.resources.memory_gb, stage)
    if override is not None:
        return Estimate(stage, float(override), {}, "resources.memory_gb")
    B = 4 / 1e9  # fp32 bytes per element, in GB
    parts: dict[str, float] = {}
    gpu = None
    sized_by = None
    if stage == "generator_prep":
        need = prep_memory(settings, on_gpu)
        parts, gpu, sized_by = dict(need.parts), need.gpu_gb, need.sized_by or None
    elif stage == "synthesis":
        from persrep.generation.base import unet_activation_gb

        p = diffusion_params(settings.generator.base_model)
        total = sum(p.values())
        syn = settings.synthesis  # cache_size loaded generators of the base model's size + inference
        act = unet_activation_gb(p["unet"], syn.resolution, syn.batch_size * 2, False, True)
        copies = max(1, cache_size)
        infer = {"weights": copies * total * B, "activations": act,
                 "filter": 0.1 if syn.filter.enabled else 0.0}
        gpu = (copies * total * 2 / 1e9 + act / 2) if on_gpu else None
        parts = {"weights (staged)": total * B} if on_gpu else infer
    elif stage in ("personalization", "evaluation"):
        largest = 0.0
        for bs in settings.personalization.backbones:
            if stage == "personalization":
                params, acts = backbone_size(bs.name, bs.weights, bs.image_size)
                batch = settings.personalization.batch_size * 3
                need = {"weights": params * B, "activations": acts * batch * B}
            else:
                ev = settings.evaluation
                params, acts_dense = backbone_size(bs.name, bs.weights, ev.dense_input_size)
                _, acts = backbone_size(bs.name, bs.weights, bs.image_size)
                # no gradients: only a few layers' outputs are alive at once
                need = {"weights": params * B, "activations": (acts_dense + acts * ev.batch_size) * B * 0.3}
            if sum(need.values()) > largest:
                largest, parts = sum(need.values()), need
        gpu = largest if on_gpu else None
        if on_gpu:
            parts = {"weights (staged)": parts["weights"]}
    else:
        raise ValueError(f"unknown stage {stage!r}: one of {STAGES}")
    parts["process"] = PROCESS_GB
    return Estimate(stage, round(sum(parts.values()), 2), {k: round(v, 2) for k, v in parts.items()},
                    gpu_gb=round(gpu, 2) if gpu is not None else None, sized_by=sized_by)


def prep_memory(settings: Any, on_gpu: bool) -> Any:
    """The largest generator-prep need among the configured types that train per instance, each
    from its own section (:meth:`~persrep.generation.base.PersonalizedGenerator.prep_memory`)."""
    from persrep.generation.base import MemoryNeed, Sampler, generator_class, section_of

    needs = [MemoryNeed({})]
    for type_name in settings.generator.types:
        cls = generator_class(type_name)
        if cls.capabilities.trains_per_instance:
            needs.append(cls.prep_memory(section_of(cls, settings), Sampler.of(settings), on_gpu,
                                         lambda: diffusion_params(settings.generator.base_model)))
    return max(needs, key=lambda n: sum(n.parts.values()))  # the first of equals


# ---------------------------------------------------------------------------------------------
# the plan: what each stage will get on the cluster
@dataclass
class NodeShape:
    cpus: float
    gpus: float
    memory_gb: float


@dataclass
class StagePlan:
    stage: str
    units: int
    estimate: Estimate
    cpus: float
    gpus: float
    per_node: int  # concurrent units the largest node fits

    def line(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        extra = f"; ~{self.estimate.gpu_gb:.1f} GB on the GPU" if self.estimate.gpu_gb else ""
        return (f"plan {self.stage}: {self.units} unit(s), each {self.cpus:g} CPU{gpu} and "
                f"{self.estimate.describe()}{extra}; up to {self.per_node} at once on the largest node")


def stage_requests(settings: Any, has_gpus: bool) -> dict[str, tuple[float, float]]:
    """(CPUs, GPUs) one unit of each heavy stage reserves. A personalisation unit is a Tune trial:
    ``resources.tune_trial_gpus`` (fractions pack several trials on one GPU, and the plan counts them)."""
    res = settings.resources
    on_gpu = has_gpus and res.gpus_per_trial > 0
    heavy = (res.cpus_per_trial, res.gpus_per_trial if on_gpu else 0.0)
    return {"generator_prep": heavy, "evaluation": heavy,
            "personalization": (res.cpus_per_trial, res.tune_trial_gpus if has_gpus else 0.0),
            "synthesis": (res.cpus_per_actor, 1.0 if has_gpus else 0.0)}


def concurrency(node: NodeShape, cpus: float, gpus: float, memory_gb: float) -> int:
    fits = [node.memory_gb / memory_gb if memory_gb > 0 else math.inf,
            node.cpus / cpus if cpus > 0 else math.inf]
    if gpus > 0:
        fits.append(node.gpus / gpus)
    n = min(fits)
    return int(n + 1e-9) if math.isfinite(n) else 1


# the settings that size one unit's memory, per stage (named in the refusal)
SIZE_SETTINGS = {"generator_prep": "the generator section's resolution and batch size",
                 "synthesis": "synthesis.resolution, synthesis.batch_size",
                 "personalization": "personalization.batch_size, personalization.backbones[].image_size",
                 "evaluation": "evaluation.batch_size, evaluation.dense_input_size"}
CPU_SETTINGS = {"synthesis": "resources.cpus_per_actor"}
GPU_SETTINGS = {"synthesis": "resources.num_gpus", "personalization": "resources.gpus_per_tune_trial"}


def _no_fit(stage: str, est: "Estimate", cpus: float, gpus: float, nodes: list[NodeShape], largest: float) -> str:
    """Why one unit of ``stage`` fits on no node, naming the resource and the setting to change."""
    most_cpus, most_gpus = max(nd.cpus for nd in nodes), max(nd.gpus for nd in nodes)
    if cpus > most_cpus + 1e-9:
        key = CPU_SETTINGS.get(stage, "resources.cpus_per_trial")
        return (f"{stage}: one unit asks for {cpus:g} CPUs ({key}) but the largest node has "
                f"{most_cpus:g}: lower {key}, or add a node with more CPUs")
    if gpus > 0 and not any(nd.gpus >= gpus - 1e-9 for nd in nodes):
        key = GPU_SETTINGS.get(stage, "resources.gpus_per_trial")
        return (f"{stage}: one unit asks for {gpus:g} GPUs ({key}) but the largest node has "
                f"{most_gpus:g}: lower {key}, or add a node with more GPUs")
    return (f"{stage}: one unit needs {est.describe()} of memory but the largest node offers "
            f"{largest:.1f} GiB to Ray: use a node with more memory, make the unit smaller "
            f"({est.sized_by or SIZE_SETTINGS.get(stage, 'resolution, batch size')}; LoRA instead of full fine-tuning), "
            f"or set resources.memory_gb.{stage} if you measured less")


def plan_stages(settings: Any, units: dict[str, int], nodes: list[NodeShape],
                requests: dict[str, tuple[float, float]], on_gpu: bool) -> list[StagePlan]:
    """One :class:`StagePlan` per stage with units; raises :class:`InsufficientResourcesError`
    (one line, the fix) when a unit fits on no node. ``requests``: stage -> (cpus, gpus)."""
    if not nodes:
        raise InsufficientResourcesError("no node with resources found in the cluster")
    plans = []
    for stage in STAGES:
        n = units.get(stage, 0)
        if not n:
            continue
        est = estimate_stage(settings, stage, on_gpu)
        cpus, gpus = requests.get(stage, (1.0, 0.0))
        largest = max(nd.memory_gb for nd in nodes)
        if largest < est.gb <= OVERCOMMIT * largest and est.basis == "estimate":
            # Ray offers less than the node has (its object store and a safety margin are kept
            # back): a unit this close to the node's size runs alone on it, and the plan says so
            # exactly the node's figure: rounded, 15.996 GiB became 16.0 and then fitted nowhere
            est = Estimate(stage, largest, est.parts, "whole node", est.gpu_gb, est.sized_by)
        best = max(nodes, key=lambda nd: concurrency(nd, cpus, gpus, est.gb))
        per_node = concurrency(best, cpus, gpus, est.gb)
        if per_node < 1:
            raise InsufficientResourcesError(_no_fit(stage, est, cpus, gpus, nodes, largest))
        plans.append(StagePlan(stage, n, est, cpus, gpus, per_node))
    return plans


def count_units(settings: Any, n_instances: int, n_categories: int) -> dict[str, int]:
    """Units per stage before any of them is planned (upper bounds: failures remove some)."""
    from persrep.generation.base import generator_caps
    from persrep.generation.plan import data_configs, negative_configs

    configs = data_configs(settings)
    trained = [t for t in settings.generator.types if generator_caps(t).trains_per_instance]
    pos = sum(not generator_caps(c.generator).positives_are_real for c in configs) * n_instances
    neg = len(negative_configs(settings)) * n_categories if settings.personalization.negatives == "generated" else 0
    backbones = len(settings.personalization.backbones)
    adapters = len(configs) * n_instances * backbones
    return {"generator_prep": len(trained) * n_instances, "synthesis": pos + neg,
            "personalization": adapters,
            "evaluation": adapters + (backbones if settings.evaluation.evaluate_pretrained else 0)}
