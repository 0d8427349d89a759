"""The whole persrep job: ``ray job submit -- python ray_jobs/run_all.py --config paper ...``.

Also runs on a laptop: without ``RAY_ADDRESS`` it starts a local Ray cluster for the run.
Settings: ``--config NAME|FILE`` plus ``key.sub=value`` overrides; ``--data`` and ``--storage``
are shortcuts for ``data.path=`` and ``storage.root=``. ``--no-ray`` runs every unit in-process.
Exit code: 0 all units finished, 1 some units failed (the summary names them), 2 bad input.
"""

from __future__ import annotations

import sys

from persrep.distributed.job import describe_cluster, main, parse_args  # noqa: F401 (the entry point's API)

if __name__ == "__main__":
    sys.exit(main())
