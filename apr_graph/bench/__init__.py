"""Benchmarks: speedup, accuracy and overhead of apr-graph against the baselines users would
otherwise use, side by side in one process. Run ``apr bench`` (or ``python -m apr_graph.bench``);
the entry point is ``apr_graph.bench.main.main``.

Nothing is imported here: the overhead server (``overhead_server``) runs in a process of its
own and must start without the whole benchmark.
"""

__all__: list[str] = []
