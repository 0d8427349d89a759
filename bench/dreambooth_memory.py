"""Peak host memory of one full DreamBooth unit (UNet + text encoder, AdamW, prior preservation)
against the memory plan's estimate, at SD 1.5's architecture and at narrower UNets.

Each width runs in its own process (so peaks do not mix), from the SD 1.5 stand-in built by
``bench/paper_dryrun.py`` (random weights; ``persrep.models.standins``): ``--widths 1.0`` is the
real SD 1.5 UNet (needs ~18 GiB free), narrower widths scale its ``block_out_channels``. The
process's RSS is sampled every 10 ms and marked after loading, after each step and after the
weights are serialised. Writes ``bench/dreambooth_memory.json``.

    python bench/dreambooth_memory.py --widths 0.4 0.5 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1024 ** 3


def narrow_model(width: float, root: Path) -> Path:
    """The SD 1.5 stand-in with its UNet's channels scaled by ``width`` (1.0: the stand-in itself)."""
    from persrep.models.standins import build_standins, standins_dir

    build_standins(sd=True, timm_models=False)
    src = standins_dir() / "sd15"
    if width == 1.0:
        return src
    dst = root / f"sd15_w{width}"
    if (dst / "DONE").exists():
        return dst
    import torch
    from diffusers import UNet2DConditionModel

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("diffusion_pytorch_model.safetensors"))
    shutil.copy(src / "vae" / "diffusion_pytorch_model.safetensors", dst / "vae")
    cfg = json.loads((src / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [int(c * width) for c in cfg["block_out_channels"]]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    unet.to(torch.float16).save_pretrained(dst / "unet")
    (dst / "DONE").write_text("")
    return dst


def measure(model: str, steps: int, resolution: int) -> dict:
    """Train one unit in this process; RSS marks and peak."""
    import psutil

    proc, peak, marks = psutil.Process(), [0], []

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()

    def mark(name: str) -> None:
        marks.append({"at": name, "rss_gib": round(proc.memory_info().rss / GIB, 2),
                      "peak_gib": round(peak[0] / GIB, 2)})

    from PIL import Image

    from persrep.config import Settings
    from persrep.generation import dreambooth as db
    from persrep.models.diffusion import load_components
    from persrep.pipeline.memory import diffusion_params, estimate_stage

    mark("imports")
    settings = Settings()
    settings.generator.base_model = model
    settings.generator.dreambooth = settings.generator.dreambooth.model_copy(update=dict(
        steps=steps, resolution=resolution, use_lora=False, train_text_encoder=True, prior_preservation=True,
        num_class_images=2, mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=True))
    estimate = estimate_stage(settings, "generator_prep")
    components = load_components(model, "cpu")
    mark("loaded")
    images = [Image.new("RGB", (resolution, resolution), (40 * i, 100, 50)) for i in range(3)]
    masks = [Image.new("L", (resolution, resolution), 255) for _ in images]
    started = time.perf_counter()
    result = db.train_dreambooth(components, images, "mug", settings.generator.dreambooth, class_images=images[:2],
                                 masks=masks, masked=True, progress=lambda step, loss: mark(f"step {step}"))
    seconds = time.perf_counter() - started
    mark("serialised")
    params = diffusion_params(model)
    return {"params_m": {k: round(v / 1e6, 1) for k, v in params.items()},
            "weights_gib": round(sum(params.values()) * 4 / GIB, 2),
            "peak_gib": round(peak[0] / GIB, 2), "marks": marks, "train_seconds": round(seconds, 1),
            "file_gib": round(sum(len(v) for v in result.files.values()) / GIB, 2),
            "estimate_gib": round(estimate.gb, 2), "estimate_parts_gb": estimate.parts,
            "estimate_over_measured": round(estimate.gb / (peak[0] / GIB), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--work", default="/tmp/persrep-dreambooth-memory")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this model in this process
    ap.add_argument("--out", default=str(HERE / "dreambooth_memory.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.resolution)))
        return
    runs = []
    for width in args.widths:
        model = narrow_model(width, Path(args.work))
        done = subprocess.run([sys.executable, __file__, "--one", str(model), "--steps", str(args.steps),
                               "--resolution", str(args.resolution)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            runs.append({"width": width, "error": (done.stderr or "").strip().splitlines()[-1:],
                         "exit_code": done.returncode})
        else:
            runs.append({"width": width, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(json.dumps(runs[-1])[:400], flush=True)
    import psutil

    out = {"what": "peak RSS of one full masked-DreamBooth unit (UNet + text encoder, AdamW, prior "
                   "preservation, gradient checkpointing) on CPU vs persrep/pipeline/memory.py's estimate",
           "command": "python bench/dreambooth_memory.py " + " ".join(sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
                       "platform": platform.platform()},
           "steps": args.steps, "resolution": args.resolution, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
