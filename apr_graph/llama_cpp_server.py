"""llama-cpp-python's OpenAI-compatible server, with llama.cpp's ``--no-repack``.

``python -m apr_graph.llama_cpp_server --no-repack ARGS`` runs ``python -m llama_cpp.server
ARGS`` with every model loaded without llama.cpp's extra CPU buffer types (weights repacked
for AMX or for wider SIMD), which is what ``llama-server --no-repack`` does. A llama.cpp built
natively on a CPU that reports AMX uses it through those buffers, and a VM that does not let
programs use AMX kills the server on its first request; without them the same build answers.
llama-cpp-python's ``Llama`` does not expose the field (``llama_model_params.use_extra_bufts``),
so the default parameters it starts from are wrapped here, in this process only.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

__all__ = ["NO_REPACK", "main"]

NO_REPACK = "--no-repack"


def _without_extra_buffers() -> None:
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def params() -> Any:
        value = defaults()
        value.use_extra_bufts = False
        return value

    lib.llama_model_default_params = params


def main(argv: list[str]) -> None:
    """Run llama-cpp-python's server with ``argv``, less ``--no-repack`` which is ours."""
    if NO_REPACK in argv:
        argv = [arg for arg in argv if arg != NO_REPACK]
        _without_extra_buffers()
    sys.argv = ["llama_cpp.server", *argv]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
