"""`--config paper` end to end at the real architectures (random weights), the smallest sizes.

The same path as bench/paper_dryrun.py (which commits bench/paper_dryrun.json with the full
DreamBooth variant): SD 1.5 masked DreamBooth with prior preservation and text-encoder training,
generated backgrounds, filtering, three ViT-B backbones, dense tasks, through Ray. CI runs the LoRA
DreamBooth variant: full fine-tuning of the SD 1.5 UNet peaks near 16 GB on CPU.
"""

import importlib.util
import json
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
MIN_AVAILABLE_GB = 9  # SD 1.5 in fp32 (~4.3 GB) in one Ray worker at a time, plus the driver and Ray


@pytest.mark.slow
def test_paper_config_end_to_end_at_real_architectures(tmp_path):
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open-clip-torch (the CLIP BPE vocabulary for the SD 1.5 tokenizer) is not installed: "
                    "pip install persrep[bench]")
    avail = psutil.virtual_memory().available / 2**30
    if avail < MIN_AVAILABLE_GB:
        pytest.skip(f"{avail:.1f} GB available < {MIN_AVAILABLE_GB} GB for an SD 1.5-size unit")
    sys.path.insert(0, str(REPO / "bench"))
    import paper_dryrun

    out = tmp_path / "dryrun.json"
    code = paper_dryrun.main(["--variant", "lora", "--scale", "ci", "--fresh", "--storage", str(tmp_path / "root"),
                              "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["exit_code"] == 0, doc["log_tail"]
    assert set(doc["stages"]) == {"base_images", "generator_prep", "synthesis", "personalization", "evaluation"}
    assert all(s["status"] == "done" and s["failed"] == 0 and s["done"] == s["units"] for s in doc["stages"].values())
    assert doc["row_errors"] == 0 and not doc["failures"]
    # 1 instance x (real-only, cut-and-paste, masked DreamBooth) x DINOv2 ViT-B/14 (CI keeps one of the
    # three backbones; bench/paper_dryrun.json has all three)
    assert len(doc["adapters"]) == 3 and {a["backbone"] for a in doc["adapters"]} == {"vit_base_patch14_dinov2.lvd142m"}
    for a in doc["adapters"]:  # trained on the positives its data configuration names
        assert a["as_named"], a
        if a["data_config"] != "real_only":
            assert a["positives_source"] == "synthetic" and a["positives_trained_on"] >= 1
    # GPU-only settings on CPU: one warning each, from the pre-flight
    assert len(doc["warnings"]) == 2
    assert code == 0
