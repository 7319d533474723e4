"""Thin ctypes binding to the ggml libraries inside llama-cpp-python (see _lib for why).

Importing this package loads libggml-base, libggml-cpu and libggml from the installed
llama_cpp package and checks every symbol the stage engine uses; a mismatch raises
GgmlBindingError naming the llama-cpp-python version this binding was written for.
"""

from __future__ import annotations

from node.engines.ggml import ops, structs
from node.engines.ggml._lib import (
    EXPECTED_LLAMA_CPP_PYTHON,
    LIBS,
    GgmlBindingError,
    bind,
    check_symbols,
    library_dir,
    required_symbols,
)
from node.engines.ggml.backend import (
    Buffer,
    CpuBackend,
    GgmlError,
    GraphAllocator,
    MetaContext,
    shape,
    strides,
    tensor_get,
    tensor_set,
    tensor_struct,
)
from node.engines.ggml.ops import Context, Graph, Tensor

__all__ = [
    "EXPECTED_LLAMA_CPP_PYTHON",
    "LIBS",
    "Buffer",
    "Context",
    "CpuBackend",
    "GgmlBindingError",
    "GgmlError",
    "Graph",
    "GraphAllocator",
    "MetaContext",
    "Tensor",
    "bind",
    "check_symbols",
    "library_dir",
    "ops",
    "required_symbols",
    "shape",
    "strides",
    "structs",
    "tensor_get",
    "tensor_set",
    "tensor_struct",
]
