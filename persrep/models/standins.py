"""Stand-ins for the paper's models: the real architectures with random weights, saved like downloads.

Nothing can be downloaded here, but whether a code path works does not depend on weight values.
:func:`build_standins` writes, once, under one directory:

- ``sd15/``: a diffusers directory with Stable Diffusion 1.5's architecture (UNet 320/640/1280/1280,
  cross-attention 768; VAE 128/256/512/512; CLIP ViT-L/14 text encoder, 12 layers x 768; PNDM
  scheduler with SD 1.5's schedule) and its real tokenizer: the CLIP BPE vocabulary that ships in
  the ``open-clip-torch`` wheel (``pip install persrep[bench]``), turned into ``vocab.json`` +
  ``merges.txt``. ``generator.base_model=<dir>/sd15`` loads it like a downloaded copy.
- ``hub/``: a Hugging Face hub cache (``HF_HUB_CACHE``) holding timm's ViT-B/14 DINOv2, ViT-B/16
  CLIP and ViT-B/16 MAE (``model.safetensors`` + ``config.json``), so ``weights: timm/...``
  resolves offline (set ``HF_HUB_CACHE=<dir>/hub HF_HUB_OFFLINE=1``; :func:`standin_env`).

Weights are seeded (the same on every machine) and stored in fp16 (half the disk; loaders upcast).
A ``DONE`` marker is written last, so an interrupted build is redone, never half used.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from pathlib import Path

STANDINS_VERSION = 1
PAPER_TIMM = ("vit_base_patch14_dinov2.lvd142m", "vit_base_patch16_clip_224.openai", "vit_base_patch16_224.mae")
DEFAULT_DIR = Path(os.environ.get("PERSREP_STANDINS", Path.home() / ".cache" / "persrep" / "standins"))
_REVISION = "0" * 40  # the snapshot "commit" of the fake hub entries


class StandinsError(RuntimeError):
    pass


def standins_dir(root: str | Path | None = None) -> Path:
    return Path(root or DEFAULT_DIR) / f"v{STANDINS_VERSION}"


def standin_env(root: str | Path | None = None) -> dict[str, str]:
    """Environment that makes ``timm/...`` weights resolve to the stand-ins, offline."""
    return {"HF_HUB_CACHE": str(standins_dir(root) / "hub"), "HF_HUB_OFFLINE": "1"}


def clip_bpe_file() -> Path:
    """The real CLIP BPE vocabulary, from the installed open-clip-torch wheel (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise StandinsError("the CLIP tokenizer vocabulary ships in the open-clip-torch wheel, which is not "
                            "installed: `pip install persrep[bench]` (or open-clip-torch)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise StandinsError(f"{path}: missing from the open-clip-torch install; reinstall it")
    return path


def _bytes_to_unicode() -> dict[int, str]:  # CLIP's (and GPT-2's) reversible byte -> unicode map
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(dest: Path) -> None:
    """``vocab.json`` + ``merges.txt`` + configs of CLIP's tokenizer (49408 tokens), from the BPE file."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                     encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "do_lower_case": True}))
    (dest / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))


def write_sd15(dest: Path, seed: int = 0) -> None:
    """SD 1.5's UNet, VAE, text encoder, tokenizer and scheduler (random weights) in diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from persrep.models.diffusion import _SD_SCHEDULE

    write_clip_tokenizer(dest / "tokenizer")
    PNDMScheduler.from_config(dict(_SD_SCHEDULE)).save_pretrained(dest / "scheduler")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        text.to(torch.float16).save_pretrained(dest / "text_encoder")
        del text
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], sample_size=512, scaling_factor=0.18215)
        vae.to(torch.float16).save_pretrained(dest / "vae")
        del vae
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        unet.to(torch.float16).save_pretrained(dest / "unet")
        del unet
    (dest / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}))


def write_timm_hub(hub: Path, names: tuple[str, ...] = PAPER_TIMM, seed: int = 0) -> None:
    """timm models with random weights as hub cache entries ``models--timm--<name>``."""
    import timm
    import torch
    from safetensors.torch import save_file

    for name in names:
        snap = hub / f"models--timm--{name}" / "snapshots" / _REVISION
        snap.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(snap / "model.safetensors"))
        cfg = dict(model.pretrained_cfg)
        (snap / "config.json").write_text(json.dumps({
            "architecture": name.split(".")[0], "num_classes": model.num_classes,
            "num_features": model.num_features, "pretrained_cfg": {
                k: v for k, v in cfg.items() if isinstance(v, (str, int, float, list, tuple, bool)) or v is None}},
            default=list))
        refs = snap.parent.parent / "refs"
        refs.mkdir(exist_ok=True)
        (refs / "main").write_text(_REVISION)


def build_standins(root: str | Path | None = None, sd: bool = True, timm_models: bool = True,
                   say=print) -> Path:
    """Build the stand-ins once (cached); returns their directory. Each part is finished by a marker."""
    base = standins_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    parts = [("sd15", write_sd15, sd), ("hub", write_timm_hub, timm_models)]
    for name, write, wanted in parts:
        done = base / f"{name}.DONE"
        if not wanted or done.exists():
            continue
        say(f"stand-ins: building {name} in {base / name} (once)")
        shutil.rmtree(base / name, ignore_errors=True)
        write(base / name)
        done.write_text("ok\n")
    return base
