"""The pipeline's stages as plain library functions: download -> extract -> compress -> merge -> evaluate.

Each reads its inputs from the workspace's ``artifacts/`` tree, writes its outputs atomically and
returns a small JSON-able summary; ``run(stage, p, root)`` runs one. One module per stage
(``mergeflow.stages.download`` ...), the workspace layout (``layout``), the unit protocol of the
fan-out (``units``) and the table of what each stage reads and runs (``spec``). Prefect tasks
(``tasks/``) and ``dvc.yaml`` both call these; nothing here knows about either.
"""

from mergeflow.stages.layout import QUERIES_NAME, STAGES, SWITCH_SUFFIX, Layout, Log, family_of, preflight, require, tasks_of
from mergeflow.stages.units import Map, finish, run, run_stage_units, run_unit, units

__all__ = [
    "QUERIES_NAME",
    "STAGES",
    "SWITCH_SUFFIX",
    "Layout",
    "Log",
    "Map",
    "family_of",
    "finish",
    "preflight",
    "require",
    "run",
    "run_stage_units",
    "run_unit",
    "tasks_of",
    "units",
]
