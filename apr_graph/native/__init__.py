"""The protocols of native parallel reasoners: their tags, prompts, joins and answers.

The node that runs them is ``apr_graph.nodes.native``; this package only knows the text.
"""

from apr_graph.native.answer import final_answer
from apr_graph.native.formats import FORMATS, NativeFormat, NativeProtocolError, Outline

__all__ = ["FORMATS", "NativeFormat", "NativeProtocolError", "Outline", "final_answer"]
