"""A Ray Tune sweep over persrep settings: ``python ray_jobs/sweep.py --space tune_spaces/toy.yaml``.

Thin entry point (also for ``ray job submit``); the job, its options and exit codes are
documented in :mod:`persrep.distributed.sweep_job` (``persrep sweep`` is the same code).
"""

from __future__ import annotations

import sys

from persrep.distributed.sweep_job import main, parse_args  # noqa: F401 (the entry point's API)

if __name__ == "__main__":
    sys.exit(main())
