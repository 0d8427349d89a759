"""Find your personalised objects in a photo collection: ``ray job submit -- python ray_jobs/find.py
--run s3://bucket/runs/runs/<id> --photos s3://bucket/photos``. ``persrep find`` is the same code.

Exit code: 0 done (unreadable photos are listed, not fatal), 2 bad input (one line, before compute).
"""

from __future__ import annotations

import sys

from persrep.distributed.find import main, parse_args  # noqa: F401 (the entry point's API)

if __name__ == "__main__":
    sys.exit(main(prog="find"))
