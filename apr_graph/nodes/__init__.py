"""The graph's nodes, one module each. Factories take the client; nodes never build one."""

from apr_graph.nodes.decompose import make_decompose
from apr_graph.nodes.fan_out import make_fan_out, make_join
from apr_graph.nodes.finish import make_finish
from apr_graph.nodes.synthesize import make_synthesize
from apr_graph.nodes.worker import Verifier, make_worker

__all__ = [
    "Verifier",
    "make_decompose",
    "make_fan_out",
    "make_finish",
    "make_join",
    "make_synthesize",
    "make_worker",
]
