"""Tiny settings (``key=value`` override lists) that several test modules run the pipeline with.

Moved unchanged from the modules that defined them (pytest puts tests/ on sys.path:
``from worlds import TINY``).
"""

from __future__ import annotations

from persrep.config import BackboneSettings

# the toy world, 2 categories x 2 instances, every generator type (was test_pipeline.TINY)
TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6",
        "generator.dreambooth.steps=2", "generator.dreambooth.num_class_images=2",
        "synthesis.num_positives=4", "synthesis.inference_steps=2", "synthesis.resolution=32",
        "personalization.max_steps=3", "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.dense_input_size=64"]

# real-only + cut-and-paste: 4 synthesis units, 8 adapters, 9 evaluations; ~10 s in-process
# (was test_faults.FAST)
FAST = [*TINY, "generator.types=[real_only, cut_paste]", "evaluation.tasks=[classification, retrieval]",
        "tracking.enabled=false"]

# one instance, real-only + cut-and-paste, global tasks (was test_job_submit.TINY; test_console
# adds resources.max_retries=1)
ONE_INSTANCE = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
                "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6", "data.max_instances=1",
                "generator.types=[real_only, cut_paste]", "evaluation.tasks=[classification, retrieval]",
                "synthesis.num_positives=4", "synthesis.resolution=32",
                "personalization.max_steps=3", "personalization.batch_size=4",
                "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
                "resources.cpus_per_trial=0.5"]

# backbones (test_backbones, test_lora): a ViT of DINOv2's architecture with random weights, and
# the real offline EfficientNet-Lite0
TINY_DINO = BackboneSettings(name="vit_base_patch14_dinov2.lvd142m", weights="tiny")
OFFLINE = BackboneSettings(name="tf_efficientnet_lite0", weights="offline")
