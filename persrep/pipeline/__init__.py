"""The pipeline: stages over keyed units, run by an executor (in-process or Ray)."""

from persrep.pipeline.runner import RunSummary, run_pipeline

__all__ = ["RunSummary", "run_pipeline"]
