"""Evaluation benchmark: pool embedding throughput, and the full four-task evaluation of one
instance against a ~1,000-image pool, cold (embeds everything) vs cached (pool embedded earlier).

    python bench/evaluate.py [--instances-per-category 25] [--out bench/evaluate.json]

Uses the toy world (generated into a temp dir, deterministic) and the real offline
EfficientNet-Lite0 through the same ``Evaluator`` the pipeline uses. Cold = a fresh cache;
cached = a second instance evaluated with the same cache, which is what evaluating 100 instances
against the pretrained backbone costs per instance after the first. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances-per-category", type=int, default=21,
                    help="toy instances per category (4 categories x 12 test images each)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--dense-input-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "evaluate.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from persrep.config import load_settings
    from persrep.data.layout import open_dataset
    from persrep.data.toy import write_toy_dataset
    from persrep.evaluation.stage import Evaluator

    s = load_settings("local", [f"evaluation.dense_input_size={args.dense_input_size}",
                                "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, "
                                f"image_size: {args.image_size}}}]"])
    bs = s.personalization.backbones[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = write_toy_dataset(Path(tmp) / "toy", categories=4,
                                 instances_per_category=args.instances_per_category, image_size=128)
        t_data = time.perf_counter() - t0
        ds = open_dataset(str(root))
        ev = Evaluator(ds, s.evaluation)
        pools = ev.pools
        n_global = len(pools.test) + len(pools.train)
        first, second = ds.names[0], ds.names[1]

        t0 = time.perf_counter()
        cold_rows = ev.evaluate_pretrained(bs, [first], {"backbone": bs.name})
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached_rows = ev.evaluate_pretrained(bs, [second], {"backbone": bs.name})
        t_cached = time.perf_counter() - t0

        # embedding throughput alone (global pool, fresh extractor key so nothing is cached)
        from persrep.evaluation.cache import EmbeddingCache
        from persrep.evaluation.features import WithGlobalFeature
        from persrep.evaluation.stage import LazyImages
        from persrep.models.backbones import build_backbone, eval_transform

        extractor = WithGlobalFeature(build_backbone(bs).eval(), "cls")
        imgs = LazyImages(ds, pools.test, eval_transform(bs))
        t0 = time.perf_counter()
        EmbeddingCache(batch_size=s.evaluation.batch_size).global_embeddings(extractor, "tput", imgs, "tput")
        t_embed = time.perf_counter() - t0

    result = {
        "benchmark": "evaluate", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "torch_threads": args.threads},
        "settings": {"backbone": bs.name, "image_size": bs.image_size,
                     "dense_input_size": args.dense_input_size, "tasks": list(s.evaluation.tasks),
                     "instances": len(ds.names), "test_pool": len(pools.test),
                     "gallery": len(pools.train), "dense_pool": len(pools.dense)},
        "toy_world_seconds": t_data,
        "embed_images_per_s": len(pools.test) / t_embed,
        "one_instance_cold_s": t_cold, "one_instance_cached_s": t_cached,
        "cold_over_cached": t_cold / t_cached, "rows": [len(cold_rows), len(cached_rows)],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"pool: {len(pools.test)} test + {len(pools.train)} gallery ({n_global} global images), "
          f"{len(pools.dense)} dense images; {bs.name} at {bs.image_size} px, dense at {args.dense_input_size} px")
    print(f"{'measure':40s} {'value':>10s}")
    print(f"{'embedding (images/s)':40s} {result['embed_images_per_s']:10.1f}")
    print(f"{'one instance, 4 tasks, cold (s)':40s} {t_cold:10.1f}")
    print(f"{'one instance, 4 tasks, cached (s)':40s} {t_cached:10.2f}")
    print(f"{'cold / cached':40s} {t_cold / t_cached:10.1f}")
    print(f"{'peak RSS (MB)':40s} {result['peak_rss_mb']:10.0f}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
