"""Where a weight lives: in one of the CPU backend's extra buffer types when llama.cpp would put it there.

llama.cpp loads a weight into the first buffer type whose device supports the op that
uses it, trying the CPU's "extra" buffer types (CPU_REPACK: Q4_0, Q4_K, IQ4_NL... in an
interleaved layout with their own GEMM/GEMV kernels) before the plain CPU buffer. The
repacked kernels are faster, and they sum in another order: a stage that kept such a
weight in the plain layout would differ from llama.cpp in the last bits (enough to change
a greedy token of gemma-3 within a few dozen). So the stage engine asks the backend the
same question with the same probe (a matrix product of the weight by a 512-row batch,
the weight sitting in an empty buffer of the candidate type) and places the weight where
llama.cpp does. EdgeMesh loads llama.cpp without extra buffer types (see
mesh.llama_runtime: their kernels depend on the number of rows), so with
EXTRA_BUFFER_TYPES off every weight is in the plain buffer here too; the probe stays for the
day that switch is turned on, when both sides must again agree weight by weight.
"""

from __future__ import annotations

import ctypes
import functools
import logging

from mesh.llama_runtime import EXTRA_BUFFER_TYPES
from node.engines.ggml import ops
from node.engines.ggml._lib import F
from node.engines.ggml.backend import GgmlError, MetaContext, tensor_struct
from node.engines.ggml.structs import TYPE_F32

log = logging.getLogger(__name__)

_PROBE_ROWS = 512  # the batch llama.cpp's probe multiplies a weight by
_GET_EXTRA_BUFTS = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


@functools.lru_cache(maxsize=1)
def _cpu_device_and_extras() -> tuple[int, tuple[int, ...]]:
    reg = F["ggml_backend_cpu_reg"]()
    dev = F["ggml_backend_reg_dev_get"](reg, 0) if reg else None
    if not dev:
        raise GgmlError("the ggml CPU backend has no device")
    address = F["ggml_backend_reg_get_proc_address"](reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return int(dev), ()
    array = _GET_EXTRA_BUFTS(address)(dev)
    extras: list[int] = []
    i = 0
    while array and array[i]:
        extras.append(int(array[i]))
        i += 1
    names = [(F["ggml_backend_buft_name"](b) or b"?").decode() for b in extras]
    log.debug("CPU extra buffer types: %s", ", ".join(names) or "none")
    return int(dev), tuple(extras)


def extra_buffer_type_for_matmul(weight: ops.Tensor) -> int | None:
    """The extra buffer type llama.cpp would load `weight` into when a matrix product uses it,
    or None for the plain CPU buffer. `weight` must not be allocated yet."""
    if not EXTRA_BUFFER_TYPES:
        return None
    dev, extras = _cpu_device_and_extras()
    if not extras:
        return None
    st = tensor_struct(weight)
    assert not st.buffer, "the probe sets the weight's buffer; it must not be allocated yet"
    probe = MetaContext(4)
    try:
        batch = ops.new_tensor_3d(probe.ptr, TYPE_F32, st.ne[0], _PROBE_ROWS, st.ne[2])
        product = ops.mul_mat(probe.ptr, weight, batch)
        for buft in extras:
            empty = F["ggml_backend_buft_alloc_buffer"](buft, 0)
            if not empty:
                continue
            st.buffer = empty
            try:
                supported = bool(F["ggml_backend_dev_supports_op"](dev, product))
            finally:
                st.buffer = None
                F["ggml_backend_buffer_free"](empty)
            if supported:
                return buft
        return None
    finally:
        probe.close()


def buffer_type_name(buft: int) -> str:
    return (F["ggml_backend_buft_name"](buft) or b"?").decode()
