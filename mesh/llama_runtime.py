"""How every llama.cpp model in an EdgeMesh process is loaded: without ggml's extra buffer types.

ggml's CPU backend can move weights into "extra" buffer types at load: repacked layouts for
its own tiled kernels, or Intel AMX tiles. Those kernels are chosen by how many rows a product
has (a vector path for a few rows, tiles past a threshold), so a token's numbers would depend
on how many rows ran beside it: a prompt chunk of 512 against one of 64, a decode step of one
session against eight. EdgeMesh promises the opposite (a token is a function of the request,
its seed and its position), and its stage engine, which runs the plain kernels, must match
llama.cpp bit for bit. Seen on an AMX machine (2026-12-04, llama-cpp-python 0.3.36 built
natively there): with the AMX buffers every multi-token llama_decode of the default model
crashed the process; without them, a 1,500-token prompt fed in chunks of 16 to 512 tokens
gave bit-identical logits and the same 48 greedy tokens.

The stage engine reads the same switch (node.engines.ggml.placement), so its weights sit in
the buffers llama.cpp's do and the two stay bit-identical.

`install()` makes that the default for llama-cpp-python's own `Llama` too (it asks
`llama_model_default_params` for its parameters), so a reference run in a test or a
benchmark loads the model exactly as a node does. Call it before a model is loaded.
"""

from __future__ import annotations

from typing import Any

_MARK = "_edgemesh_plain_buffers"
# Whether weights may go into ggml's extra (repacked, AMX) buffer types: llama.cpp's
# `use_extra_bufts`, and the stage engine's placement. Both read this one constant.
EXTRA_BUFFER_TYPES = False


def install() -> None:
    """From now on, llama.cpp's default model parameters in this process keep the weights in
    plain CPU buffers. Idempotent."""
    import llama_cpp
    import llama_cpp.llama_cpp as raw

    current = raw.llama_model_default_params
    if getattr(current, _MARK, False):
        return

    def plain_buffers() -> Any:
        params = current()
        params.use_extra_bufts = EXTRA_BUFFER_TYPES
        return params

    setattr(plain_buffers, _MARK, True)
    raw.llama_model_default_params = plain_buffers  # what llama_cpp.Llama and _internals look up
    llama_cpp.llama_model_default_params = plain_buffers  # the package's re-export


def model_params() -> Any:
    """llama.cpp's model parameters as EdgeMesh loads every model (see the module's doc)."""
    install()
    import llama_cpp

    return llama_cpp.llama_model_default_params()
