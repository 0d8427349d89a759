"""DreamBooth personalisation of Stable Diffusion (plain and masked), and base-model sampling.

Training follows the reference (../shared/docs/REFERENCE.md, not in this repository): instance
prompt ``a photo of <new1> {category}``, class prompt ``A photo of {category}``, prior preservation
on class images drawn from the base model, optional text-encoder training, constant learning rate,
gradient clipping at 1.0. Either the whole UNet (+ text encoder) is fine-tuned, or LoRA adapters on
the attention projections (UNet ``to_q/to_k/to_v/to_out.0``; text encoder ``q/k/v/out_proj``)
through peft.

Masked DreamBooth multiplies the noise prediction and the target of the *instance* images by
``(mask + floor) / max(mask + floor)`` (mask at latent resolution) before the MSE. With the default
floor 0.01 a background residual is scaled by ~1 %, so its squared error (and gradient) weighs
~1e-4 of the foreground's: the model learns the object, not the three photos' backgrounds.

Number of instance images: the benchmarks use exactly 3. 1-2 or more than 3 are accepted (all are
used) with a warning; 0 is an error. Masked DreamBooth without masks is an error naming the
alternative (``dreambooth``).

Determinism: every random draw of training (image order, VAE latent sample, noise, timesteps) comes
from one CPU generator seeded with ``settings.seed``, and LoRA init from ``torch.manual_seed``; two
CPU runs with the same inputs give bit-identical weights. Sampling gives each row its own
generator (see :func:`persrep.models.diffusion.generate_images`).

Negatives are never drawn from a personalised model: :class:`BaseModelSampler` samples the
un-personalised base model with the category prompt and refuses prompts containing ``<new1>``.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from persrep.config import content_key
from persrep.keys import result_settings
from persrep.generation.base import (IDENTIFIER, Capabilities, GeneratorArtifact, InstanceData, MemoryNeed,
                                     PersonalizedGenerator, Sampler, SampledImage, SampleRow, Services, SharedInput,
                                     instance_data_key, register_generator, unet_activation_gb)
from persrep.generation.dreambooth_settings import DreamBoothSettings
from persrep.hashing import stable_seed
from persrep.models.diffusion import (TINY, DiffusionComponents, component_identity, generate_grouped,
                                      generate_images, load_components, make_pipeline)

logger = logging.getLogger(__name__)

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
BENCHMARK_IMAGES_PER_INSTANCE = 3
CLASS_GUIDANCE = 7.5  # the DreamBooth reference's class-image guidance scale
CLASS_IMAGES = "class_images"  # the shared input it reads at generator prep
_warned_no_8bit = False


# ---------------------------------------------------------------------------------------------
# images, masks and the masked loss
def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop a square, scale to [-1, 1] (C,H,W)."""
    image = _square(image.convert("RGB"), resolution, Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def mask_to_tensor(mask: Image.Image, resolution: int) -> torch.Tensor:
    """Binary foreground mask (1,H,W), cropped exactly like its image; foreground = pixel > 127."""
    mask = _square(mask.convert("L"), resolution, Image.Resampling.NEAREST)
    data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8)
    return (data.view(1, resolution, resolution) > 127).float()


def _square(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def latent_mask_weights(masks: torch.Tensor, latent_size: tuple[int, int], floor: float) -> torch.Tensor:
    """(B,1,H,W) pixel masks -> (B,1,h,w) weights ``(m + floor) / max(m + floor)`` per image."""
    small = F.interpolate(masks.float(), size=latent_size, mode="nearest")
    weights = small + floor
    peak = weights.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return weights / peak


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference's masked loss: MSE of the weighted prediction against the weighted target."""
    return F.mse_loss((prediction * weights).float(), (target * weights).float())


# ---------------------------------------------------------------------------------------------
# class images for prior preservation
def class_images(base_model: str, category: str, count: int, resolution: int, seed: int,
                 cache_dir: str | Path, class_prompt: str = "A photo of {category}",
                 inference_steps: int = 50, guidance_scale: float = 7.5, scheduler: str = "pndm",
                 batch_size: int = 8, device: Any = None) -> list[Image.Image]:
    """``count`` images of ``category`` from the base model, cached as PNGs under ``cache_dir``.

    Image ``i`` depends only on (model, prompt, resolution, sampler, seed, i), so asking for more
    images later reuses the ones already drawn. Files are written under a temporary name and
    renamed, so a crash never leaves a truncated image in the cache.
    """
    prompt = class_prompt.format(category=category)
    key = content_key("class-images", component_identity(base_model), prompt, resolution,
                      inference_steps, guidance_scale, scheduler, seed)
    folder = Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        logger.info("drawing %d class images of %r from %s into %s", len(missing), prompt, base_model, folder)
        pipe = make_pipeline(load_components(base_model, device), scheduler)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            seeds = [stable_seed("class-image", seed, i) for i in chunk]
            for i, image in zip(chunk, generate_images(pipe, [prompt] * len(chunk), seeds, guidance_scale,
                                                       inference_steps, resolution)):
                tmp = paths[i].with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(paths[i])
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


# ---------------------------------------------------------------------------------------------
# training
@dataclass
class DreamBoothResult:
    files: dict[str, bytes]  # safetensors blobs: unet[_lora], text_encoder[_lora] (when trained)
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = 0.0


def check_instance_images(instance: InstanceData, masked: bool) -> None:
    n = len(instance.train_images)
    if n == 0:
        raise ValueError(f"instance {instance.name!r} has no training images: DreamBooth needs "
                         f"{BENCHMARK_IMAGES_PER_INSTANCE} photos of the object (1-2 work, worse)")
    if masked and not instance.train_masks:
        raise ValueError(f"instance {instance.name!r} has no train masks, which masked_dreambooth "
                         "needs (train_masks/ in the data set): add masks or use generator type "
                         "'dreambooth' instead")
    if n != BENCHMARK_IMAGES_PER_INSTANCE:
        warnings.warn(f"instance {instance.name!r} has {n} training images; DreamBooth uses all of "
                      f"them, but the benchmarks use exactly {BENCHMARK_IMAGES_PER_INSTANCE}, so "
                      "results are not comparable to published numbers", stacklevel=3)


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``).

    PyTorch's CPU tensors below glibc's mmap threshold live on the heap; freed, they stay in the
    process's RSS, which is what Ray's memory monitor and the OOM killer count. No-op elsewhere.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _make_optimizer(params: list[torch.nn.Parameter], settings: DreamBoothSettings, on_gpu: bool):
    global _warned_no_8bit
    if settings.use_8bit_adam and on_gpu:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=1e-2)
        except ImportError:
            if not _warned_no_8bit:  # the run's pre-flight warned once (persrep.models.accelerator)
                _warned_no_8bit = True
                logger.info("use_8bit_adam: bitsandbytes is not installed, using torch AdamW")
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=1e-2)


def _lora_config(rank: int, targets: list[str]):
    from peft import LoraConfig

    # gaussian A, zero B: the adapted model starts exactly equal to the base model
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


def _add_lora(module: torch.nn.Module, rank: int, targets: list[str]) -> None:
    if hasattr(module, "add_adapter") and module.__class__.__module__.startswith("diffusers"):
        module.add_adapter(_lora_config(rank, targets))
    else:
        # transformers 5.24's add_adapter demands peft >= 0.22 (we pin 0.21): inject directly,
        # which gives the same adapter layers and state-dict keys
        from peft import inject_adapter_in_model

        inject_adapter_in_model(_lora_config(rank, targets), module)


def _merge_lora(module: torch.nn.Module) -> None:
    """Fold LoRA into the base weights for sampling: faster, and a layer's output for one image no
    longer depends on the batch size through the extra low-rank matmuls (bit-exact on CPU)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()


def _to_safetensors(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})


def _from_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _trained_state(module: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(module)
    return module.state_dict()


def _make_trainable(components: DiffusionComponents, settings: DreamBoothSettings,
                    amp_dtype: torch.dtype | None) -> list[torch.nn.Parameter]:
    """Add LoRA or unfreeze weights, set precision and checkpointing; return the trained params."""
    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    train_te = settings.train_text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    if settings.use_lora:
        _add_lora(unet, settings.lora_rank, UNET_LORA_TARGETS)
        if train_te:
            _add_lora(text_encoder, settings.lora_rank, TEXT_LORA_TARGETS)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(train_te)
    if amp_dtype is not None:  # frozen weights in half precision; trainable ones stay fp32
        torch.nn.Module.to(vae, dtype=amp_dtype)
        for module, trained in ((unet, not settings.use_lora), (text_encoder, train_te and not settings.use_lora)):
            if not trained:
                torch.nn.Module.to(module, dtype=amp_dtype)
                for p in module.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()
    if settings.gradient_checkpointing and (components.device.type == "cuda" or components.base_model != TINY):
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif settings.gradient_checkpointing:
        logger.info("gradient checkpointing skipped: tiny model on CPU (memory is not the limit)")
    unet.train()
    text_encoder.train(train_te)
    return [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]


def train_dreambooth(components: DiffusionComponents, instance_images: list[Image.Image], category: str,
                     settings: DreamBoothSettings, *, class_images: list[Image.Image] | None = None,
                     masks: list[Image.Image] | None = None, masked: bool = False,
                     progress: Callable[[int, float], None] | None = None,
                     log_every: int | None = None) -> DreamBoothResult:
    """Fine-tune ``components`` in place for one instance; return the trained weights and losses.

    ``class_images`` are required when ``settings.prior_preservation`` is on (see
    :func:`class_images`). ``progress(step, loss)`` is called after every step; the loss is also
    logged every ``log_every`` steps (default: ten times per run).
    """
    if not instance_images:
        raise ValueError("train_dreambooth needs at least one instance image")
    if masked and (not masks or len(masks) != len(instance_images)):
        raise ValueError("masked DreamBooth needs one mask per instance image; use masked=False otherwise")
    prior = settings.prior_preservation and settings.prior_loss_weight > 0
    if prior and not class_images:
        raise ValueError("prior_preservation is on but no class images were given: pass "
                         "class_images=... or set generator.dreambooth.prior_preservation=false")
    from diffusers import DDPMScheduler

    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    device, res, bsz = components.device, settings.resolution, settings.batch_size
    on_gpu = device.type == "cuda"
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.mixed_precision) if on_gpu else None
    train_te = settings.train_text_encoder

    torch.manual_seed(settings.seed)  # LoRA initialisation draws from the global generator
    rng = torch.Generator("cpu").manual_seed(settings.seed)
    params = _make_trainable(components, settings, amp_dtype)
    optimizer = _make_optimizer(params, settings, on_gpu)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def encode(images: list[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            pixels = torch.stack([image_to_tensor(im, res) for im in images]).to(device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
        return list(zip(dist.mean.float().cpu(), dist.std.float().cpu()))

    def sample_latents(encoded: list[tuple[torch.Tensor, torch.Tensor]], idx: list[int]) -> torch.Tensor:
        mean = torch.stack([encoded[i][0] for i in idx])
        std = torch.stack([encoded[i][1] for i in idx])
        return (mean + std * torch.randn(mean.shape, generator=rng)) * vae.config.scaling_factor

    def ids_for(prompt: str) -> torch.Tensor:
        return components.tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt",
                                    max_length=components.tokenizer.model_max_length).input_ids

    instance_encoded = encode(instance_images)
    pixel_masks = torch.stack([mask_to_tensor(m, res) for m in masks]) if masked else None
    class_encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    ids = ids_for(settings.instance_prompt.format(category=category)).repeat(bsz, 1)
    if prior:
        ids = torch.cat([ids, ids_for(settings.class_prompt.format(category=category)).repeat(bsz, 1)])
    order: list[int] = []
    losses: list[float] = []
    log_every = log_every or max(1, settings.steps // 10)
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        while len(order) < bsz:  # walk the instance images in a fresh random order each epoch
            order += torch.randperm(len(instance_images), generator=rng).tolist()
        idx, order = order[:bsz], order[bsz:]
        latents = sample_latents(instance_encoded, idx)
        if prior:
            cidx = torch.randint(0, len(class_images), (bsz,), generator=rng).tolist()
            for i in cidx:
                if i not in class_encoded:
                    class_encoded[i] = encode([class_images[i]])[0]
            latents = torch.cat([latents, sample_latents(class_encoded, cidx)])
        noise = torch.randn(latents.shape, generator=rng)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=rng)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        noisy, target, timesteps = noisy.to(device), target.to(device), timesteps.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with torch.set_grad_enabled(train_te):
                hidden = text_encoder(ids.to(device))[0]
            prediction = unet(noisy, timesteps, hidden).sample.float()
        pred_inst, target_inst = prediction[:bsz], target[:bsz]
        if masked:
            weights = latent_mask_weights(pixel_masks[idx].to(device), tuple(pred_inst.shape[-2:]),
                                          settings.mask_floor)
            loss = masked_mse(pred_inst, target_inst, weights)
        else:
            loss = F.mse_loss(pred_inst, target_inst)
        if prior:
            loss = loss + settings.prior_loss_weight * F.mse_loss(prediction[bsz:], target[bsz:])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
        if step % log_every == 0 or step == settings.steps:
            logger.info("dreambooth step %d/%d loss %.4f", step, settings.steps, losses[-1])
    seconds = (time.perf_counter() - started) / settings.steps
    # Free the optimizer's state before serialising: under AdamW it is twice the trained weights
    # (7.3 GiB for SD 1.5's UNet + text encoder), and serialising holds another copy of the weights
    # as bytes. Together they made the end of a full fine-tuning unit its peak, above a 24 GiB node
    # (bench/paper_dryrun_full.json); the peak is now the training step.
    del optimizer, scaler
    _release_freed_memory()
    unet.eval()
    text_encoder.eval()
    suffix = "_lora" if settings.use_lora else ""
    files = {f"unet{suffix}.safetensors": _to_safetensors(_trained_state(unet, settings.use_lora))}
    if train_te:
        files[f"text_encoder{suffix}.safetensors"] = _to_safetensors(_trained_state(text_encoder, settings.use_lora))
    return DreamBoothResult(files, losses, seconds)


def apply_dreambooth_weights(components: DiffusionComponents, files: dict[str, bytes], lora_rank: int) -> None:
    """Load trained weights (``train_dreambooth``'s files) into freshly loaded base components."""
    from peft.utils import set_peft_model_state_dict

    for name, module, targets in (("unet", components.unet, UNET_LORA_TARGETS),
                                  ("text_encoder", components.text_encoder, TEXT_LORA_TARGETS)):
        if f"{name}_lora.safetensors" in files:
            state = _from_safetensors(files[f"{name}_lora.safetensors"])
            _add_lora(module, lora_rank, targets)
            result = set_peft_model_state_dict(module, state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{name} LoRA weights do not fit the base model (unexpected keys, e.g. "
                                 f"{result.unexpected_keys[:3]}): was it trained on another base_model?")
            _merge_lora(module)
        elif f"{name}.safetensors" in files:
            state = _from_safetensors(files[f"{name}.safetensors"])
            dtype = next(module.parameters()).dtype
            module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    if not any(k.startswith("unet") for k in files):
        raise ValueError(f"no UNet weights among the artifact's files {sorted(files)}")


# ---------------------------------------------------------------------------------------------
# sampling
def _sample_rows(pipe, rows: list[SampleRow], synthesis: Any) -> list[SampledImage]:
    images = generate_grouped(pipe, [r.prompt for r in rows], [r.seed for r in rows], [r.cfg for r in rows],
                              synthesis.inference_steps, synthesis.resolution, synthesis.batch_size)
    return [SampledImage(image, None, row) for image, row in zip(images, rows)]


class BaseModelSampler:
    """Samples the un-personalised base model for category negatives (never the identifier).
    ``sampler``: the shared sampler section (:class:`~persrep.generation.base.Sampler`)."""

    def __init__(self, sampler: Sampler, device: Any = None):
        self.sampler = sampler
        self.device = device
        self._pipe = None

    def negative_prompt(self, category: str) -> str:
        return self.sampler.class_prompt.format(category=category)

    def sample(self, rows: list[SampleRow]) -> list[SampledImage]:
        leaking = [r.prompt for r in rows if IDENTIFIER in r.prompt]
        if leaking:
            raise ValueError(f"base-model prompts must not contain the identifier {IDENTIFIER}: "
                             f"{leaking[0]!r} (negatives show the category, not the instance)")
        if self._pipe is None:
            self._pipe = make_pipeline(load_components(self.sampler.base_model, self.device), self.sampler.scheduler)
        return _sample_rows(self._pipe, rows, self.sampler)


@register_generator
class DreamBoothGenerator(PersonalizedGenerator):
    """DreamBooth on the instance's photos; positives from the personalised model."""

    type_name = "dreambooth"
    needs_training = True
    capabilities = Capabilities(trains_per_instance=True, uses_guidance=True, uses_captions=True,
                                needs_base_model=True, shared_inputs=frozenset({"class_images"}))
    settings_class = DreamBoothSettings
    section_name = "dreambooth"  # generator.dreambooth (masked_dreambooth reads it too)
    masked = False

    @classmethod
    def create(cls, section: DreamBoothSettings, sampler: Sampler, services: Services, category: str,
               stage: str) -> "DreamBoothGenerator":
        """At generator prep: the category's prior-preservation images from their shared unit."""
        gen = cls(section, sampler, services)
        if stage == "generator_prep":
            gen.prior_images = services.shared_images(CLASS_IMAGES, category)
        return gen

    @classmethod
    def template_prompt(cls, section: DreamBoothSettings, sampler: Sampler, category: str) -> str:
        return section.instance_prompt.format(category=category)

    @classmethod
    def shared_input(cls, kind: str, section: DreamBoothSettings, sampler: Sampler,
                     category: str) -> SharedInput | None:
        """``class_images``: the category's prior-preservation images (none without prior loss)."""
        db = section
        if kind != CLASS_IMAGES or not (db.prior_preservation and db.prior_loss_weight > 0 and db.num_class_images > 0):
            return None
        return SharedInput([db.class_prompt.format(category=category)], db.num_class_images, db.seed,
                           {"steps": sampler.inference_steps, "scheduler": sampler.scheduler,
                            "cfg": CLASS_GUIDANCE, "resolution": db.resolution})

    @classmethod
    def draw_shared(cls, kind: str, spec: SharedInput, category: str, section: DreamBoothSettings,
                    sampler: Sampler) -> list[Image.Image]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the published unit is the cache
            return class_images(sampler.base_model, category, spec.count, section.resolution, spec.seed, tmp,
                                section.class_prompt, sampler.inference_steps, guidance_scale=CLASS_GUIDANCE,
                                scheduler=sampler.scheduler, batch_size=sampler.batch_size)

    @classmethod
    def prep_memory(cls, section: DreamBoothSettings, sampler: Sampler, on_gpu: bool,
                    diffusion_params: Callable[[], dict[str, int]]) -> MemoryNeed:
        """Weights (fp32, UNet + text encoder + VAE) + gradients and AdamW state of the trained
        parameters (LoRA: ~1 % of the UNet) + UNet activations (persrep.pipeline.memory)."""
        db, p = section, diffusion_params()
        total, B = sum(p.values()), 4 / 1e9
        trained = (p["unet"] * (0.01 if db.use_lora else 1.0)
                   + (p["text_encoder"] if db.train_text_encoder and not db.use_lora else 0))
        opt_bytes = 2 if (db.use_8bit_adam and on_gpu) else 8
        images = db.batch_size * (2 if db.prior_preservation else 1)
        act = unet_activation_gb(p["unet"], db.resolution, images, db.gradient_checkpointing)
        train = {"weights": total * B, "gradients": trained * B, "optimiser": trained * opt_bytes / 1e9,
                 "activations": act}
        parts = {"weights (staged)": total * B} if on_gpu else train
        return MemoryNeed(parts, sum(train.values()) if on_gpu else None,
                          "generator.dreambooth.resolution, .batch_size, .use_lora")

    @classmethod
    def device_notes(cls, section: DreamBoothSettings, cuda: bool | None = None) -> list[str]:
        from persrep.models.accelerator import dreambooth_gpu_notes

        return dreambooth_gpu_notes(section, cuda)

    def __init__(self, section: DreamBoothSettings, sampler: Sampler, services: Services | None = None,
                 device: Any = None):
        super().__init__(section, sampler, services, device)
        self._pipe = None
        self.progress: Callable[[int, float], None] | None = None  # set to watch training
        # prior-preservation images drawn once per category by the pipeline (shared_images);
        # None: draw them here, cached in prepare's out_dir
        self.prior_images: list[Image.Image] | None = None

    def settings_for_key(self) -> dict[str, Any]:
        db, syn = self.section, self.sampler
        prior = {"steps": syn.inference_steps, "scheduler": syn.scheduler} if db.prior_preservation else None
        return {"base": component_identity(syn.base_model),
                "dreambooth": result_settings(db, "generator.dreambooth"),
                "masked": self.masked, "class_image_sampler": prior}

    def prepare(self, instance: InstanceData, out_dir: str | Path) -> GeneratorArtifact:
        """Train on ``instance``. Class images are cached in ``out_dir/class_images`` (share ``out_dir``
        across instances to reuse them per category)."""
        check_instance_images(instance, self.masked)
        db, syn, base = self.section, self.sampler, self.sampler.base_model
        priors = None
        if db.prior_preservation and db.prior_loss_weight > 0 and db.num_class_images > 0:
            priors = self.prior_images or class_images(base, instance.category, db.num_class_images, db.resolution, db.seed,
                                  Path(out_dir) / "class_images", db.class_prompt, syn.inference_steps,
                                  scheduler=syn.scheduler, batch_size=syn.batch_size, device=self.device)
        elif db.prior_preservation:
            db = db.model_copy(update={"prior_preservation": False})
        result = train_dreambooth(load_components(base, self.device), instance.train_images, instance.category,
                                  db, class_images=priors, masks=instance.train_masks if self.masked else None,
                                  masked=self.masked, progress=self.progress)
        _release_freed_memory()  # the trained components are gone: a reused Ray worker keeps no 16 GiB
        record = {"settings": self.settings_for_key(), "instance": instance.name, "category": instance.category,
                  "inputs": {"instance": instance_data_key(instance)}, "losses": result.losses,
                  "seconds_per_step": result.seconds_per_step}
        files = dict(result.files)
        files["dreambooth.json"] = json.dumps(record, indent=1, sort_keys=True).encode()
        return GeneratorArtifact(self.type_name, instance.name, files, record, self.artifact_key(instance))

    def load(self, artifact: GeneratorArtifact) -> None:
        if artifact.generator_type != self.type_name:
            raise ValueError(f"artifact of type {artifact.generator_type!r} given to {self.type_name!r}")
        components = load_components(self.sampler.base_model, self.device)
        apply_dreambooth_weights(components, artifact.files, self.section.lora_rank)
        self._pipe = make_pipeline(components, self.sampler.scheduler)

    def sample(self, rows: list[SampleRow]) -> list[SampledImage]:
        if self._pipe is None:
            raise RuntimeError(f"{self.type_name}: call load(artifact) before sample()")
        negatives = [r for r in rows if r.role != "positive"]
        if negatives:
            raise ValueError(f"{self.type_name} samples positives only; negatives come from the base "
                             "model (BaseModelSampler), got a row with role "
                             f"{negatives[0].role!r}")
        return _sample_rows(self._pipe, rows, self.sampler)


@register_generator
class MaskedDreamBoothGenerator(DreamBoothGenerator):
    """DreamBooth whose instance loss weighs background pixels by ~``mask_floor`` (needs masks)."""

    type_name = "masked_dreambooth"
    capabilities = replace(DreamBoothGenerator.capabilities, needs_masks=True)
    masked = True
