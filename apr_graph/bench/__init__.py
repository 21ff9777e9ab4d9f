"""Benchmarks: speedup, accuracy and overhead of apr-graph against the baselines users would
otherwise use, side by side in one process. Run ``apr bench`` (or ``python -m apr_graph.bench``).
"""

from apr_graph.bench.main import main

__all__ = ["main"]
