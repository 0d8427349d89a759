"""SAM through ``transformers`` (``SamModel`` / ``SamProcessor``) and PerSAM on top of it.

``segmentation.model`` names the checkpoint: a model id (``facebook/sam-vit-base``; read from the
Hugging Face cache, never downloaded at run time), a local directory written by
``save_pretrained``, or ``tiny``: a 96 k-parameter SAM built from config with seeded random
weights (tests, plumbing; its masks mean nothing).

- ``sam``: prompted with a centred box (``segmentation.margin`` cut off each side); of SAM's three
  multimask outputs the one with the highest predicted IoU is kept.
- ``persam``: training-free personalisation (Personalize-SAM, Zhang et al. 2023). The reference's
  masked image-encoder features, averaged, are the *target feature*; its cosine similarity with
  the new image's features is the location prior: a positive point at its maximum, a negative
  point at its minimum. Target-guided attention (``attention_similarity`` = sigmoid of the
  standardised similarity map, ``target_embedding`` = the target feature) biases the decoder, as in
  the paper. One cascaded refinement step then re-prompts with the first mask's box plus the two
  points and keeps the best of three masks. PerSAM-F's mask-scale fine-tuning is not done.

Confidence: SAM's own predicted IoU of the chosen mask, clipped to [0, 1].
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from persrep.segmentation.base import (Needs, Reference, Segmentation, Segmenter,
                                       SegmenterUnavailableError, clean_mask, register_segmenter)

TINY_SIDE = 128  # the tiny SAM's input side


def locate_sam(model: str) -> str:
    """Where the SAM weights come from, or one line saying how to provide them."""
    fix = ("give a local directory (SamModel.save_pretrained) or a model id already in the Hugging Face "
           "cache (segmentation.model), or use segmentation.segmenter=grabcut, which needs no weights")
    if model in ("", "none"):
        raise SegmenterUnavailableError(f"segmenter sam/persam: segmentation.model is not set: {fix}")
    if model == "tiny":
        return "tiny (random, from config)"
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise SegmenterUnavailableError(f"segmentation.model={model}: no config.json in that "
                                            f"directory (not a saved SamModel): {fix}")
        return str(path.absolute())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - malformed id and friends: not cached
        cached = None
    if not isinstance(cached, str):
        raise SegmenterUnavailableError(f"segmentation.model={model}: not in the Hugging Face cache and "
                                        f"nothing may be downloaded at run time: {fix}")
    return f"{model} (cache)"


def tiny_sam() -> tuple[Any, Any]:
    """A tiny SAM from config (seeded random weights) and its processor (128 px)."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel,
                              SamProcessor, SamPromptEncoderConfig, SamVisionConfig)

    s = TINY_SIDE
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=s, patch_size=16, window_size=4, global_attn_indexes=(1,),
                             mlp_dim=64, num_pos_feats=16, initializer_range=0.02)  # default 1e-10: flat features
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=s, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SamModel(config)
    processor = SamProcessor(SamImageProcessor(
        size={"longest_edge": s}, pad_size={"height": s, "width": s},
        mask_size={"longest_edge": s // 4}, mask_pad_size={"height": s // 4, "width": s // 4}))
    return model, processor


@lru_cache(maxsize=2)
def load_sam(model: str) -> tuple[Any, Any]:
    """(SamModel in eval mode, SamProcessor) for ``model`` (see :func:`locate_sam`)."""
    locate_sam(model)
    if model == "tiny":
        net, proc = tiny_sam()
    else:
        from transformers import SamModel, SamProcessor

        try:
            net = SamModel.from_pretrained(model, local_files_only=True)
            proc = SamProcessor.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SegmenterUnavailableError(f"segmentation.model={model}: could not be loaded "
                                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    return net.eval(), proc


def _device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _SamBase(Segmenter):
    @classmethod
    def preflight(cls, settings: Any) -> str:
        return f"segmenter {cls.name}: weights {locate_sam(settings.model)}"

    def identity(self) -> dict[str, Any]:
        return {"segmenter": self.name, "model": self.settings.model, "margin": self.settings.margin}

    def _model(self) -> tuple[Any, Any, torch.device]:
        net, proc = load_sam(self.settings.model)
        dev = _device(self.device)
        return net.to(dev), proc, dev

    @staticmethod
    def _pick(proc: Any, out: Any, inputs: Any) -> tuple[np.ndarray, float]:
        masks = proc.image_processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                        inputs["reshaped_input_sizes"].cpu())[0][0]  # [K, H, W]
        scores = out.iou_scores[0, 0].float().cpu()
        best = int(scores.argmax())
        return clean_mask(masks[best].numpy().astype(bool)), float(scores[best].clamp(0, 1))

    def _box(self, image: Image.Image) -> list[float]:
        m = self.settings.margin
        w, h = image.size
        return [m * w, m * h, (1 - m) * w, (1 - m) * h]


@register_segmenter
class SamSegmenter(_SamBase):
    name = "sam"
    needs = Needs(weights=True, gpu_preferred=True, reference=False)

    def segment(self, images: list[Image.Image], reference: Reference | None = None) -> list[Segmentation]:
        net, proc, dev = self._model()
        out: list[Segmentation] = []
        for image in (i.convert("RGB") for i in images):
            inputs = proc(images=image, input_boxes=[[self._box(image)]], return_tensors="pt").to(dev)
            with torch.no_grad():
                res = net(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                          multimask_output=True)
            out.append(Segmentation(*self._pick(proc, res, inputs)))
        return out


@register_segmenter
class PerSamSegmenter(_SamBase):
    name = "persam"
    needs = Needs(weights=True, gpu_preferred=True, reference=True)

    def target_feature(self, reference: Reference) -> torch.Tensor:
        """Mean of the reference's image-encoder features under its masks, L2-normalised: [C]."""
        net, proc, dev = self._model()
        feats = []
        for image, mask in zip(reference.images, reference.masks):
            emb, inputs = self._embed(net, proc, dev, image.convert("RGB"))
            weight = self._to_grid(mask.astype(np.float32), inputs, emb.shape[-2:]).to(dev)
            if weight.sum() > 0:
                feats.append((emb[0] * weight).sum((1, 2)) / weight.sum())
        if not feats:
            raise ValueError("persam: every reference mask is empty; the instance needs a non-empty "
                             "train mask (persrep data masks)")
        return F.normalize(torch.stack(feats).mean(0), dim=0)

    def segment(self, images: list[Image.Image], reference: Reference | None = None) -> list[Segmentation]:
        if reference is None:
            raise ValueError("persam needs a reference (the instance's train images and masks); "
                             "without one use segmentation.segmenter=sam or grabcut")
        net, proc, dev = self._model()
        target = self.target_feature(reference)
        return [self._one(net, proc, dev, image.convert("RGB"), target) for image in images]

    def location_prior(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding cell with the target feature: [h, w]."""
        return torch.einsum("chw,c->hw", F.normalize(emb[0], dim=0), target)

    def _one(self, net: Any, proc: Any, dev: torch.device, image: Image.Image,
             target: torch.Tensor) -> Segmentation:
        emb, inputs = self._embed(net, proc, dev, image)
        sim = self.location_prior(emb, target)
        full = self._to_image(sim, inputs, image.size)  # [H, W] in the image's pixels
        H, W = full.shape
        pos, neg = int(full.argmax()), int(full.argmin())
        points = [[[float(pos % W), float(pos // W)], [float(neg % W), float(neg // W)]]]
        labels = [[1, 0]]
        # target-guided attention (PerSAM): the standardised similarity, as a sigmoid attention bias
        std = sim.std().clamp_min(1e-6)
        attn = torch.sigmoid((sim - sim.mean()) / std)
        side = net.config.prompt_encoder_config.image_size // net.config.prompt_encoder_config.patch_size
        attn = F.interpolate(attn[None, None], size=(side, side), mode="bilinear").flatten(2)[:, None]
        pin = proc(images=image, input_points=[points], input_labels=[labels], return_tensors="pt").to(dev)
        with torch.no_grad():
            first = net(image_embeddings=emb, input_points=pin["input_points"], input_labels=pin["input_labels"],
                        multimask_output=False, attention_similarity=attn,
                        target_embedding=target[None, None, :])
        mask, score = self._pick(proc, first, inputs)
        if mask.any():  # cascaded refinement: the first mask's box + the same points
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
            bin_ = proc(images=image, input_points=[points], input_labels=[labels], input_boxes=[[box]],
                        return_tensors="pt").to(dev)
            with torch.no_grad():
                second = net(image_embeddings=emb, input_points=bin_["input_points"],
                             input_labels=bin_["input_labels"], input_boxes=bin_["input_boxes"],
                             multimask_output=True)
            mask2, score2 = self._pick(proc, second, inputs)
            if mask2.any():
                mask, score = mask2, score2
        return Segmentation(mask, score)

    # -- geometry between the image and SAM's padded embedding grid --------------------------
    @staticmethod
    def _embed(net: Any, proc: Any, dev: torch.device, image: Image.Image) -> tuple[torch.Tensor, Any]:
        inputs = proc(images=image, return_tensors="pt").to(dev)
        with torch.no_grad():
            return net.get_image_embeddings(inputs["pixel_values"]), inputs

    @staticmethod
    def _to_grid(mask: np.ndarray, inputs: Any, grid: tuple[int, int]) -> torch.Tensor:
        """A mask in image pixels -> its coverage of each embedding cell (resize, pad, pool)."""
        rh, rw = (int(v) for v in inputs["reshaped_input_sizes"][0])
        ph, pw = inputs["pixel_values"].shape[-2:]
        m = F.interpolate(torch.from_numpy(mask)[None, None], size=(rh, rw), mode="bilinear")
        m = F.pad(m, (0, pw - rw, 0, ph - rh))
        return F.adaptive_avg_pool2d(m, tuple(grid))[0, 0]

    @staticmethod
    def _to_image(sim: torch.Tensor, inputs: Any, size: tuple[int, int]) -> np.ndarray:
        """A map on the embedding grid -> the image's pixels (upsample, unpad, resize)."""
        rh, rw = (int(v) for v in inputs["reshaped_input_sizes"][0])
        ph, pw = inputs["pixel_values"].shape[-2:]
        up = F.interpolate(sim[None, None].float().cpu(), size=(ph, pw), mode="bilinear")[..., :rh, :rw]
        return F.interpolate(up, size=(size[1], size[0]), mode="bilinear")[0, 0].numpy()
