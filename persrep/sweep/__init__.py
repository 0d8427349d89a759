"""Sweeps over settings (no Ray here): the space format (space), the shared data (data),
one trial's body (trial) and the outcome tables (results). Ray Tune drives them from
``persrep.distributed.sweep`` (``ray_jobs/sweep.py``)."""

from persrep.sweep.space import SweepError, SweepSpace, load_space

__all__ = ["SweepError", "SweepSpace", "load_space"]
