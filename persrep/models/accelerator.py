"""GPU-only settings on a machine without CUDA: one warning each, before any compute.

``generator.dreambooth.mixed_precision`` (fp16/bf16 autocast) and ``use_8bit_adam``
(bitsandbytes) only apply on a GPU. On CPU training falls back to fp32 and torch AdamW: the same
method, more memory. :func:`dreambooth_gpu_notes` names each such setting once, on the driver, so a
run never discovers it deep inside a stage (and never warns once per unit). Personalisation's
bf16 autocast and xformers are automatic (on when CUDA is present) and have no setting.
A GPU setting that cannot work anywhere (8-bit Adam without bitsandbytes on a GPU) is a warning
too: it falls back to AdamW.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def dreambooth_gpu_notes(db: Any, cuda: bool | None = None) -> list[str]:
    """One warning line per GPU-only DreamBooth setting (``generator.dreambooth``) that is on but
    cannot apply on this machine. Whether the run trains a diffusion model at all is the caller's
    question (``DreamBoothGenerator.device_notes``, asked by ``persrep.generation.base.device_notes``)."""
    cuda = cuda_available() if cuda is None else cuda
    notes = []
    if not cuda:
        if db.mixed_precision != "no":
            notes.append(f"WARNING: generator.dreambooth.mixed_precision={db.mixed_precision} needs CUDA, "
                         "none here: DreamBooth trains in fp32 (set mixed_precision=no to silence this)")
        if db.use_8bit_adam:
            notes.append("WARNING: generator.dreambooth.use_8bit_adam needs CUDA (bitsandbytes), none here: "
                         "DreamBooth uses torch AdamW (set use_8bit_adam=false to silence this)")
    elif db.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        notes.append("WARNING: generator.dreambooth.use_8bit_adam: bitsandbytes is not installed: "
                     "DreamBooth uses torch AdamW (`pip install bitsandbytes` to save optimizer memory)")
    return notes
