"""A Ray Tune sweep over persrep settings: ``python ray_jobs/sweep.py --space tune_spaces/toy.yaml``.

The space file (see ``tune_spaces/README.md``) names a base configuration, the metric to optimise
(``task.metric``; objective = the mean over instances of the personalised backbone's value), the
search (grid, random, optuna), optional ASHA early stopping over instances, and the swept keys.
Everything is validated first (one line per problem, exit 2); then the synthetic data of every
data configuration in the space is generated once, then the trials run on Ray Tune. Also runs
inside ``ray job submit``; without ``RAY_ADDRESS`` it starts a local Ray cluster.
``--data`` and ``--storage`` are shortcuts for ``data.path=`` and ``storage.root=``; trailing
``key.sub=value`` overrides go on top of the space file's ``overrides:``.
Exit code: 0 every trial finished (or was stopped early), 1 some trial or data unit failed, 2 bad input.
"""

from __future__ import annotations

import sys

from persrep.distributed.sweep_job import main, parse_args  # noqa: F401 (the entry point's API)

if __name__ == "__main__":
    sys.exit(main())
