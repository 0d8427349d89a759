#!/usr/bin/env python
"""What a re-run's skip check costs per finished unit (issue #29): bytes read and seconds on local
disk, S3 requests on a counting moto server. The check is ``Storage.is_intact`` (every stage's
"already published?" question); the code measured is whichever ``persrep`` is imported, so run it
once from a main checkout (before) and once from this one (after):

    PYTHONPATH=/path/to/main python bench/skip_check.py --label before
    python bench/skip_check.py --label after

A unit of ``--mb`` MiB in one file (a DreamBooth generator is ~4.3 GB in one safetensors file at
paper size; the default 512 MiB keeps the run short) plus a small file is published on local disk
and on s3 (moto, 8 MiB there); the check is timed ``--repeat`` times (the page cache is warm after
the first, so local seconds are a lower bound; the bytes are what an s3 or a cold disk would move).
Bytes: Linux ``/proc/self/io`` ``rchar`` of this process around the call. Results merge into
``bench/skip_check.json`` under the label.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _publish(st, mb: int) -> None:
    chunk = os.urandom(1 << 20)
    st.publish("generators", "unit", {"unet.safetensors": chunk * mb, "meta.json": b"{}"})


def local(mb: int, repeat: int) -> dict:
    from persrep.storage import Storage

    with tempfile.TemporaryDirectory(dir=os.environ.get("SKIP_BENCH_DIR")) as tmp:
        st = Storage(tmp)
        _publish(st, mb)
        runs = []
        for _ in range(repeat):
            b0, t0 = _rchar(), time.perf_counter()
            assert st.is_intact("generators", "unit")
            runs.append({"seconds": round(time.perf_counter() - t0, 4), "bytes_read": _rchar() - b0})
    return {"unit_mib": mb, "runs": runs, "seconds_min": min(r["seconds"] for r in runs),
            "bytes_read_max": max(r["bytes_read"] for r in runs)}


def s3(mb: int) -> dict:
    from _s3_counting import CountingS3Server

    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ[k] = v
    import boto3

    from persrep.storage import Storage

    srv = CountingS3Server().start()
    try:
        boto3.client("s3", endpoint_url=srv.endpoint).create_bucket(Bucket="skip")
        st = Storage("s3://skip/p", srv.endpoint)
        _publish(st, mb)
        srv.counts.reset(prefix="p")
        assert st.is_intact("generators", "unit")
        # (bytes are not counted here: the server runs in this process and reads its own store)
        return {"unit_mib": mb, "requests": srv.counts.snapshot()["ops"]}
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--s3-mb", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "skip_check.json"))
    args = ap.parse_args(argv)
    import persrep

    res = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "persrep": str(Path(persrep.__file__).parent), "loadavg": list(os.getloadavg()),
           "local": local(args.mb, args.repeat), "s3": s3(args.s3_mb)}
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"benchmark": "skip_check", "results": {}}
    doc["results"][args.label] = res
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({args.label: res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
