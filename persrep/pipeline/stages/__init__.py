"""One module per stage, in the order the runner runs them: auto_masks, captions, base_images,
generator_prep, synthesis, personalization, evaluation (the list: ``persrep.pipeline.sequence``).

Each module holds its unit dataclass, its planner, its compute function (one unit), its
contribution to the summary and its ``planned(scope) -> PlannedStage``.
"""
