"""llama-cpp-python's OpenAI-compatible server, with llama.cpp's ``--no-repack``.

``python -m apr_graph.llama_cpp_server --no-repack ARGS`` runs ``python -m llama_cpp.server
ARGS`` without llama.cpp's extra CPU buffer types (repacked weights, AMX): ``Llama`` does not
expose ``llama_model_params.use_extra_bufts``, so its default parameters are wrapped.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

__all__ = ["NO_REPACK", "main"]

NO_REPACK = "--no-repack"


def main(argv: list[str]) -> None:
    """Run llama-cpp-python's server with ``argv``, less ``--no-repack`` which is ours."""
    if NO_REPACK in argv:
        argv = [arg for arg in argv if arg != NO_REPACK]
        import llama_cpp.llama_cpp as lib

        defaults = lib.llama_model_default_params

        def params() -> Any:
            value = defaults()
            value.use_extra_bufts = False
            return value

        lib.llama_model_default_params = params
    sys.argv = ["llama_cpp.server", *argv]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
