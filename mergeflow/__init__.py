"""mergeflow: task vectors, binary task switches (T-Switch / Auto-Switch) and model merging.

The library is pure: it never imports Prefect, MLflow or DVC (those live in ``tasks``/``flows``).
"""

__version__ = "0.1.0"
