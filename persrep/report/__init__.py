"""The run report: paper-style tables and plots from a run's tidy results (HTML + Markdown).

``write_report(run_dir_or_results, out_dir)`` reads ``results.parquet`` (+ ``summary.json`` and
``settings.yaml`` when present) from a run directory (local or ``s3://``), a parquet path or a
DataFrame, and writes ``report.html`` (self-contained: plots embedded as base64 PNG), ``report.md``
and ``plots/*.png`` next to them. Tables (values x100, mean +- sample std over instances):

(a) backbone x task, pretrained vs personalised, the headline metric per task (classification AP,
    retrieval NDCG, detection / segmentation mAP@[.5:.95]); (b) generator x CFG x caption source;
    (c) classification AP per test scene; then every metric, skipped tasks with their reasons,
    stage counts, timings and the (redacted) settings.

Plots (matplotlib, Agg canvas, no pyplot state): bars per task, CFG curves (when >1 CFG), per-scene
bars, and a retrieval example grid from ``examples`` = [(query, [top-k gallery], [relevant]), ...]
(PIL images or paths). A run with in-pool negatives gets a leakage warning at the top.
"""

from __future__ import annotations

__all__ = ["HEADLINE", "write_report", "main_report", "load_run", "RunData",
           "backbone_task_table", "generation_table", "scene_table", "format_cell"]

from persrep.report.page import main_report, write_report  # noqa: E402
from persrep.report.tables import (HEADLINE, RunData, backbone_task_table, format_cell,  # noqa: E402
                                   generation_table, load_run, scene_table)
