"""The pipeline: stages over keyed units, run by an executor (in-process or Ray)."""

from persrep.pipeline.results import RunSummary
from persrep.pipeline.runner import run_pipeline

__all__ = ["RunSummary", "run_pipeline"]
