"""GPU throughput at the paper's real architectures (random weights: speed does not depend on values).

    python bench/gpu.py                       # needs CUDA; writes bench/gpu.json (device named)
    python bench/gpu.py --quick               # fewer repeats / batches (a small device budget)

Without CUDA it prints one line and exits 0, writing nothing. Uses the stand-ins
(persrep/models/standins.py: SD 1.5 as a diffusers directory, timm ViT-B in a hub cache), built
once. Measures, each in this one run:

1. SD 1.5 sampling, 512 px, 50 steps, CFG 7.5, fp16: images/s at batch 1, 8, 16, 32, with torch's
   scaled-dot-product attention, channels_last, and ``torch.compile`` of the UNet off / on;
2. DreamBooth s/step at 512 px, batch 1, prior preservation: full (UNet + text encoder, 8-bit Adam
   when bitsandbytes is installed, gradient checkpointing, fp16 autocast) and LoRA (rank 4);
3. DINOv2 ViT-B/14 LoRA + InfoNCE: optimiser steps/s at 224 px, batch 16 (x anchor/positive/
   negative), bf16 autocast;
4. the Ray Data synthesis stage vs a plain loop on the same GPU (bench/synthesis.py with the
   SD 1.5 stand-in; its own JSON, bench/gpu_synthesis.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync():
    import torch

    torch.cuda.synchronize()


def bench_sampling(sd: Path, batches: list[int], steps: int, repeats: int) -> list[dict]:
    import torch

    from persrep.models.diffusion import generate_images, load_components, make_pipeline

    out = []
    for compiled in (False, True):
        comps = load_components(str(sd), "cuda")
        pipe = make_pipeline(comps, "pndm", dtype=torch.float16)
        pipe.unet.to(memory_format=torch.channels_last)
        if compiled:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
        for bs in batches:
            try:
                generate_images(pipe, ["a photo of a mug"] * bs, list(range(bs)), 7.5, 2, 512)  # warm-up/compile
                _sync()
                t0 = time.perf_counter()
                for r in range(repeats):
                    generate_images(pipe, ["a photo of a mug"] * bs, list(range(r, r + bs)), 7.5, steps, 512)
                _sync()
                sec = (time.perf_counter() - t0) / repeats
                out.append({"batch": bs, "compile": compiled, "seconds_per_batch": round(sec, 3),
                            "images_per_s": round(bs / sec, 3),
                            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
            except torch.cuda.OutOfMemoryError:
                out.append({"batch": bs, "compile": compiled, "error": "CUDA out of memory"})
            print("sampling", out[-1], flush=True)
        del pipe, comps
        torch.cuda.empty_cache()
    return out


def bench_dreambooth(sd: Path, steps: int) -> list[dict]:
    import torch
    from PIL import Image

    from persrep.generation.dreambooth_settings import DreamBoothSettings
    from persrep.generation.dreambooth import train_dreambooth
    from persrep.models.diffusion import load_components

    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(512, 512, 3, generator=rng) * 255).byte().numpy()) for _ in range(3)]
    out = []
    for lora in (False, True):
        torch.cuda.reset_peak_memory_stats()
        settings = DreamBoothSettings(steps=steps, resolution=512, use_lora=lora, lora_rank=4, train_text_encoder=True,
                                      gradient_checkpointing=True, use_8bit_adam=True, mixed_precision="fp16")
        comps = load_components(str(sd), "cuda")
        t0 = time.perf_counter()
        res = train_dreambooth(comps, images, "mug", settings, class_images=images)
        _sync()
        out.append({"variant": "lora" if lora else "full (unet + text encoder)", "steps": steps,
                    "seconds_per_step": round(res.seconds_per_step, 3), "wall_s": round(time.perf_counter() - t0, 1),
                    "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "8bit_adam": _has("bitsandbytes")})
        print("dreambooth", out[-1], flush=True)
        del comps
        torch.cuda.empty_cache()
    return out


def bench_personalization(steps: int) -> dict:
    import torch

    from persrep.config import BackboneSettings, LoraSettings
    from persrep.contrastive.losses import info_nce
    from persrep.models.backbones import build_backbone
    from persrep.models.lora import apply_lora, lora_parameters

    bs = BackboneSettings(name="vit_base_patch14_dinov2.lvd142m", weights="timm/vit_base_patch14_dinov2.lvd142m",
                          image_size=224)
    model = apply_lora(build_backbone(bs), LoraSettings(rank=16, alpha=0.5, dropout=0.3)).cuda().train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=3e-4, betas=(0.5, 0.999))
    x = torch.randn(48, 3, 224, 224, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            f = model.global_features(x, "cls").float()
        loss = info_nce(f[:16], f[16:32], f[32:], 0.07)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    sec = (time.perf_counter() - t0) / steps
    return {"backbone": bs.name, "image_size": 224, "batch": 16, "dtype": "bf16", "steps_per_s": round(1 / sec, 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def bench_synthesis_stage(sd: Path, rows: int) -> dict:
    out = REPO / "bench" / "gpu_synthesis.json"
    cmd = [sys.executable, str(REPO / "bench" / "synthesis.py"), "--out", str(out), "--num-cpus", str(os.cpu_count() or 2),
           f"generator.base_model={sd}", "synthesis.resolution=512", "synthesis.inference_steps=50",
           "synthesis.batch_size=16", f"synthesis.num_positives={rows}", "resources.gpus_per_trial=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    doc = {"command": " ".join(cmd[1:]).replace(str(sd), "<standins>/sd15"), "exit_code": proc.returncode}
    if proc.returncode == 0 and out.exists():
        doc["result"] = json.loads(out.read_text())
    else:
        doc["error_tail"] = (proc.stdout + proc.stderr)[-2000:]
    return doc


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1, 8; fewer steps (small device budget)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sampling,dreambooth,personalization,synthesis")
    ap.add_argument("--out", default=str(REPO / "bench" / "gpu.json"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py: skipped: no CUDA device on this machine (nothing written)")
        return 0
    from persrep.models.standins import build_standins, standin_env

    std = build_standins()
    os.environ.update(standin_env())
    skip = set(filter(None, args.skip.split(",")))
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "quick": args.quick, "weights": "random (real architectures: persrep/models/standins.py)",
           "xformers": _has("xformers"), "bitsandbytes": _has("bitsandbytes")}
    parts = {
        "sampling_sd15_512px": lambda: bench_sampling(std / "sd15", [1, 8] if args.quick else [1, 8, 16, 32],
                                                      20 if args.quick else 50, 1 if args.quick else 2),
        "dreambooth_sd15_512px": lambda: bench_dreambooth(std / "sd15", 5 if args.quick else 20),
        "personalization_dinov2_vitb14": lambda: bench_personalization(10 if args.quick else 30),
        "synthesis_stage_vs_loop": lambda: bench_synthesis_stage(std / "sd15", 16 if args.quick else 64),
    }
    for name, fn in parts.items():
        if name.split("_")[0] in skip:
            continue
        t0 = time.perf_counter()
        try:
            doc[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on: the other parts still count
            doc[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")  # partial results survive a timeout
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
