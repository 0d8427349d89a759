"""The run report: a verdict, the per-instance results, paper-style tables and plots, image
galleries (HTML + Markdown).

``write_report(run_dir_or_results, out_dir)`` reads ``results.parquet`` (+ ``summary.json``,
``settings.yaml`` and ``units.json`` when present) from a run directory (local or ``s3://``), a
parquet path or a DataFrame, and writes ``report.html`` (plots embedded as base64 PNG, gallery
thumbnails in ``thumbs/``), ``report.md`` and ``plots/*.png``. In order (values x100):

- the title in words (data set, instances, data configuration, run) and a plain verdict: per task
  how many instances improved, the means and the mean difference, failed instances, the cost per
  instance (``summary.json`` ``costs``); (a) backbone x task, pretrained vs personalised;
- the warnings, a repeated one folded into one note (uncertain automatic masks with thumbnails);
- the per-instance table sorted by gain (:mod:`persrep.report.verdict`);
- plots, and only the sections the run can fill: (b) generator x CFG x caption source and (d)
  compute vs quality with more than one data configuration, (c) per test scene with scenes;
- the galleries, retrieval examples (``examples`` = [(query, [top-k gallery], [relevant]), ...]),
  and the run details folded at the end (notes, stages, costs, skipped tasks, all metrics, settings).

A run with in-pool negatives gets a leakage warning at the top.
"""

from __future__ import annotations

__all__ = ["HEADLINE", "write_report", "main_report", "load_run", "RunData",
           "backbone_task_table", "generation_table", "scene_table", "format_cell"]

from persrep.report.page import main_report, write_report  # noqa: E402
from persrep.report.tables import (HEADLINE, RunData, backbone_task_table, format_cell,  # noqa: E402
                                   generation_table, load_run, scene_table)
