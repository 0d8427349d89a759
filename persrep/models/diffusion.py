"""Stable-Diffusion components: tiny-from-config, a model id or a local directory; pipelines; sampling.

``load_components("tiny")`` builds a miniature Stable Diffusion (UNet, VAE, CLIP text encoder) from
config with random weights that are the same on every machine (fixed seed), plus an in-memory
byte-level CLIP tokenizer: nothing is downloaded, so tests and the offline default run anywhere.
Any other ``base_model`` is a Stable Diffusion 1.5-layout model (subfolders ``unet``, ``vae``,
``text_encoder``, ``tokenizer``, ``scheduler``), either a local directory or a Hugging Face model id
(read from the HF cache; downloaded only when the hub is not in offline mode). When it cannot be
found the error is one line saying where we looked and how to provide it.

``generate_images`` draws one image per (prompt, seed) with one ``torch.Generator`` per image, so an
image's starting noise depends only on its own seed, never on what else shares its batch.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from persrep.errors import ModelUnavailableError  # noqa: F401 (re-exported)
from persrep.hashing import directory_digest

logger = logging.getLogger(__name__)

TINY = "tiny"
# Bump TINY_VERSION whenever the tiny architecture or its initialisation changes: it is part of
# component_identity, so cached units built from the old tiny model are not silently reused.
TINY_VERSION = 1
TINY_SEED = 0
TINY_RESOLUTION = 64  # the tiny VAE downsamples x2, so 64 px images are 32x32 latents (UNet sample_size)
SD_RESOLUTION = 512
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULER_NAMES = ("pndm", "ddim", "dpm", "euler")

# Stable Diffusion 1.5's noise schedule; the tiny model uses it too so schedulers behave alike.
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1, skip_prk_steps=True, prediction_type="epsilon")


@dataclass
class DiffusionComponents:
    """The pieces of a Stable Diffusion model, owned together (``to`` moves/casts all of them)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # a diffusers scheduler; its config seeds every other scheduler
    resolution: int  # the native image size in pixels (a hint for training and sampling)
    base_model: str

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "DiffusionComponents":
        for module in (self.unet, self.vae, self.text_encoder):
            # plain nn.Module.to: diffusers' override warns on every dtype cast, even for models
            # with nothing to keep in fp32 (diffusers 0.42), which would flood the logs
            torch.nn.Module.to(module, device=device, dtype=dtype)
        return self


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on GPU (half the memory, tensor cores), fp32 on CPU (fp16 matmuls are slow/unsupported)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------
# tiny components
def byte_level_clip_tokenizer(max_length: int = 77):
    """A CLIP tokenizer built in memory whose vocabulary is every byte (and byte + end-of-word).

    With no merges every prompt splits into characters, so nothing is ever unknown: ``<new1>``,
    any category word and any caption tokenise, unlike a small hand-picked word list.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab.setdefault(ch + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_components(seed: int = TINY_SEED) -> DiffusionComponents:
    """Miniature SD components (diffusers' ``get_dummy_components`` shapes), same weights everywhere."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_clip_tokenizer()
    # fork_rng: building the tiny model must not disturb the caller's global random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)
        torch.manual_seed(seed)
        text_config = CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length)
        text_encoder = CLIPTextModel(text_config)
    # from_config (not the constructor) keeps keys PNDM ignores, such as clip_sample=False, which
    # DDIM reads when make_scheduler derives it from this config
    scheduler = PNDMScheduler.from_config(dict(_SD_SCHEDULE))
    for module in (unet, vae, text_encoder):
        module.eval()
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler, TINY_RESOLUTION, TINY)


# ---------------------------------------------------------------------------------------------
# real models
def _offline() -> bool:
    # read the environment at call time: huggingface_hub caches HF_HUB_OFFLINE at import
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    return env in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE)


def _looks_like_path(base_model: str) -> bool:
    return base_model.startswith(("/", "./", "../", "~")) or Path(base_model).expanduser().exists()


def _unavailable(base_model: str, where: str, reason: str, local: bool = False) -> ModelUnavailableError:
    first = (reason.strip().splitlines() or ["not found"])[0][:200]
    layout = f"a local directory in diffusers layout (subfolders {', '.join(SD_SUBFOLDERS)})"
    if local:
        fix = f"give generator.base_model as {layout}, a model id, or tiny"
    else:
        fix = (f"provide it as {layout} via generator.base_model=/path/to/dir, or pre-populate a "
               f"Hugging Face cache on a machine with network (`hf download {base_model}`) and point "
               "HF_HOME at it; or use generator.base_model=tiny")
    return ModelUnavailableError(f"base model {base_model!r} is not available: looked in {where} "
                                 f"({first}); {fix}")


def _load_stable_diffusion(base_model: str, device: torch.device, dtype: torch.dtype) -> DiffusionComponents:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if _looks_like_path(base_model):
        source = str(Path(base_model).expanduser().resolve())
        if not Path(source).is_dir():
            raise _unavailable(base_model, f"local directory {source}", "no such directory", local=True)
        missing = [s for s in SD_SUBFOLDERS if not (Path(source) / s).is_dir()]
        if missing:
            raise _unavailable(base_model, f"local directory {source}", f"missing subfolders {missing}",
                               local=True)
        where, hub_kwargs, local = f"local directory {source}", {}, True
    else:
        source = base_model
        local_only = _offline()
        where = f"the Hugging Face cache {_hub_cache_dir()}" + (" (HF_HUB_OFFLINE is set)" if local_only else "")
        hub_kwargs, local = {"local_files_only": local_only}, False
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 passes a deprecated argument to the hub client on every load: noise
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **hub_kwargs)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **hub_kwargs)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype,
                                                         **hub_kwargs)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub_kwargs)
            scheduler = PNDMScheduler.from_pretrained(source, subfolder="scheduler", **hub_kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/loader errors become one actionable line
        raise _unavailable(base_model, where, f"{type(exc).__name__}: {exc}", local) from None
    components = DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler, SD_RESOLUTION, base_model)
    for module in (unet, vae, text_encoder):
        module.eval()
    return components.to(device)


def load_components(base_model: str = TINY, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> DiffusionComponents:
    """Load ``tiny`` or a Stable Diffusion 1.5-layout model onto ``device`` (default: GPU if present).

    ``dtype`` defaults to float32: training keeps trainable weights in fp32 and uses autocast;
    sampling pipelines cast to fp16 on GPU in :func:`make_pipeline`.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    if base_model == TINY:
        return tiny_components().to(device, dtype)
    return _load_stable_diffusion(base_model, device, dtype)


def component_identity(base_model: str) -> dict[str, Any]:
    """What determines the base model's weights, as a small JSON-able dict for unit keys.

    Stable across machines: a local directory is identified by its name and the content of its
    config files plus the names and sizes of its weight files (not its absolute path, not weights'
    bytes, which would cost a multi-GB read per key).
    """
    if base_model == TINY:
        return {"kind": "tiny", "version": TINY_VERSION, "seed": TINY_SEED}
    if _looks_like_path(base_model) and Path(base_model).expanduser().is_dir():
        root = Path(base_model).expanduser().resolve()

        def entry(rel: str, path: Path) -> bytes:
            if path.suffix in (".json", ".txt"):
                return rel.encode() + b"\0" + path.read_bytes() + b"\0"
            if path.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
                return f"{rel}:{path.stat().st_size}\0".encode()
            return b""

        return {"kind": "local", "name": root.name, "content": directory_digest(root, entry, 16)}
    return {"kind": "hub", "model_id": base_model}


def require_available(base_model: str) -> None:
    """Before compute: a missing local directory, or a hub model that is not cached while offline,
    fails now with the one line :func:`load_components` would give after minutes."""
    if base_model == TINY:
        return
    if _looks_like_path(base_model):
        source = Path(base_model).expanduser().resolve()
        missing = [s for s in SD_SUBFOLDERS if not (source / s).is_dir()]
        if not source.is_dir() or missing:
            raise _unavailable(base_model, f"local directory {source}",
                               "no such directory" if not source.is_dir() else f"missing subfolders {missing}",
                               local=True)
    elif _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(base_model, "unet/config.json", cache_dir=_hub_cache_dir()), str):
            raise _unavailable(base_model, f"the Hugging Face cache {_hub_cache_dir()} (HF_HUB_OFFLINE is set)",
                               "not in the cache")


# ---------------------------------------------------------------------------------------------
# pipelines and sampling
def make_scheduler(components: DiffusionComponents, scheduler_name: str):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           PNDMScheduler)

    classes = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
               "euler": EulerDiscreteScheduler}
    if scheduler_name not in classes:
        raise ValueError(f"unknown scheduler {scheduler_name!r}: choose one of {list(classes)}")
    return classes[scheduler_name].from_config(components.scheduler.config)


def make_pipeline(components: DiffusionComponents, scheduler_name: str = "pndm",
                  dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline over ``components`` (no safety checker) for sampling.

    Casts the components in place to ``dtype`` (default: fp16 on GPU, fp32 on CPU). On GPU, torch
    2's scaled-dot-product attention is already memory-efficient; xformers is enabled when
    installed.
    """
    from diffusers import StableDiffusionPipeline

    device = components.device
    components.to(device, dtype or default_dtype(device))
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=make_scheduler(components, scheduler_name),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        try:
            import xformers  # noqa: F401

            pipe.enable_xformers_memory_efficient_attention()
            logger.info("xformers memory-efficient attention enabled")
        except Exception:  # noqa: BLE001 - SDPA (the torch 2 default) is the fallback
            pass
    return pipe


def generate_images(pipeline, prompts: list[str], seeds: list[int], guidance_scale: float,
                    num_inference_steps: int, resolution: int, negative_prompt: str = "") -> list[Image.Image]:
    """One image per (prompt, seed), all with the same guidance scale, in one batch.

    Each image gets its own CPU ``torch.Generator`` seeded with its seed, so its starting latent
    (and any scheduler noise) is the same whether it is drawn alone or with others, on any device.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: need one seed per prompt")
    if not prompts:
        return []
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    with torch.no_grad():
        out = pipeline(prompt=list(prompts), negative_prompt=[negative_prompt] * len(prompts),
                       height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                       guidance_scale=float(guidance_scale), generator=generators, output_type="pil")
    return list(out.images)


def generate_grouped(pipeline, prompts: list[str], seeds: list[int], guidance_scales: list[float],
                     num_inference_steps: int, resolution: int, batch_size: int) -> list[Image.Image]:
    """Images for rows with mixed guidance scales, in input order.

    One pipeline call has one guidance scale, so rows are grouped by scale and drawn in chunks of
    ``batch_size``; per-image seeds make the grouping invisible in the results.
    """
    images: list[Image.Image | None] = [None] * len(prompts)
    by_scale: dict[float, list[int]] = {}
    for i, scale in enumerate(guidance_scales):
        by_scale.setdefault(float(scale), []).append(i)
    for scale, members in by_scale.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            drawn = generate_images(pipeline, [prompts[i] for i in chunk], [seeds[i] for i in chunk], scale,
                                    num_inference_steps, resolution)
            for i, image in zip(chunk, drawn):
                images[i] = image
    return images  # type: ignore[return-value]
