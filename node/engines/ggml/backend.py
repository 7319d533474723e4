"""Owning wrappers for ggml resources: metadata contexts, the CPU backend, buffers, graph allocators.

Each wrapper frees its C object exactly once (close() is idempotent), so an engine can
release memory deterministically instead of waiting for the garbage collector.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from node.engines.ggml import ops
from node.engines.ggml._lib import F
from node.engines.ggml.structs import STATUS_SUCCESS, InitParams, TensorStruct

log = logging.getLogger(__name__)


class GgmlError(RuntimeError):
    """A ggml call reported failure (allocation failed, compute returned an error status)."""


class MetaContext:
    """A no_alloc ggml context: holds tensor and graph metadata only; data lives in backend buffers."""

    def __init__(self, n_tensors: int, *, graph_size: int = 0) -> None:
        size = n_tensors * ops.tensor_overhead()
        if graph_size:
            size += ops.graph_overhead_custom(graph_size, False)
        ptr = F["ggml_init"](InitParams(mem_size=size, mem_buffer=None, no_alloc=True))
        if not ptr:
            raise GgmlError(f"ggml_init failed for {size} bytes of metadata")
        self.ptr = ops.Context(ptr)

    def close(self) -> None:
        if self.ptr:
            F["ggml_free"](self.ptr)
            self.ptr = ops.Context(0)

    def __del__(self) -> None:
        self.close()


def tensor_struct(t: ops.Tensor) -> TensorStruct:
    """A live view of a tensor's C struct (valid while its context lives)."""
    return TensorStruct.from_address(t)


def shape(t: ops.Tensor) -> tuple[int, int, int, int]:
    ne = tensor_struct(t).ne
    return (ne[0], ne[1], ne[2], ne[3])


def strides(t: ops.Tensor) -> tuple[int, int, int, int]:
    nb = tensor_struct(t).nb
    return (nb[0], nb[1], nb[2], nb[3])


_MADV_HUGEPAGE = 14  # linux/mman.h
_PMD_SIZE_FILE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
_DEFAULT_HUGE_PAGE = 2 * 1024 * 1024  # x86-64 and 4 KiB-page arm64


@functools.lru_cache(maxsize=1)
def _huge_page_bytes() -> int:
    try:  # 512 MiB on 64 KiB-page arm64 kernels, for instance
        return int(Path(_PMD_SIZE_FILE).read_text().strip())
    except (OSError, ValueError):
        return _DEFAULT_HUGE_PAGE


@functools.lru_cache(maxsize=1)
def _libc_madvise() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def advise_huge_pages(base: int, size: int) -> bool:
    """Ask Linux to back [base, base + size) with transparent huge pages, before it is touched.
    A decode step streams every weight once (gemma-3's 178 MB embedding is the output matrix
    too), and with 4 KiB pages the TLB misses of that stream cost ~5% of a step here.
    Kernels whose THP mode is "madvise" (a common default) only do it when asked."""
    if sys.platform != "linux":
        return False
    madvise = _libc_madvise()
    page = _huge_page_bytes()
    start = (base + page - 1) // page * page
    end = (base + size) // page * page
    if madvise is None or end <= start:
        return False
    if madvise(start, end - start, _MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
        return False
    return True


class Buffer:
    """A backend buffer that holds every tensor of one context (weights, KV cache)."""

    def __init__(self, ctx: MetaContext, backend: CpuBackend, *, usage: int, buffer_type: int | None = None,
                 huge_pages: bool = False) -> None:
        # buffer_type: one of the CPU's extra buffer types (see placement); None = the backend's own.
        # huge_pages: for large buffers read by every step (weights, KV cache); see advise_huge_pages
        ptr = (F["ggml_backend_alloc_ctx_tensors"](ctx.ptr, backend.ptr) if buffer_type is None
               else F["ggml_backend_alloc_ctx_tensors_from_buft"](ctx.ptr, buffer_type))
        if not ptr:
            raise GgmlError("ggml_backend_alloc_ctx_tensors failed (out of memory?)")
        self.ptr: int = ptr
        F["ggml_backend_buffer_set_usage"](ptr, usage)
        if huge_pages:
            base = F["ggml_backend_buffer_get_base"](ptr)
            if base:
                advise_huge_pages(int(base), self.size)

    @property
    def size(self) -> int:
        return int(F["ggml_backend_buffer_get_size"](self.ptr)) if self.ptr else 0

    def clear(self, value: int = 0) -> None:
        F["ggml_backend_buffer_clear"](self.ptr, value)

    def close(self) -> None:
        if self.ptr:
            F["ggml_backend_buffer_free"](self.ptr)
            self.ptr = 0

    def __del__(self) -> None:
        self.close()


class CpuBackend:
    def __init__(self, threads: int) -> None:
        ptr = F["ggml_backend_cpu_init"]()
        if not ptr:
            raise GgmlError("ggml_backend_cpu_init failed")
        self.ptr: int = ptr
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        F["ggml_backend_cpu_set_n_threads"](self.ptr, threads)
        self.threads = threads

    def compute(self, graph: ops.Graph) -> None:
        status = F["ggml_backend_graph_compute"](self.ptr, graph)
        if status != STATUS_SUCCESS:
            raise GgmlError(f"ggml_backend_graph_compute returned status {status}")

    def default_buffer_type(self) -> int:
        return int(F["ggml_backend_get_default_buffer_type"](self.ptr))

    def close(self) -> None:
        if self.ptr:
            F["ggml_backend_free"](self.ptr)
            self.ptr = 0

    def __del__(self) -> None:
        self.close()


class GraphAllocator:
    """ggml_gallocr: plans and places every intermediate tensor of a graph in one reusable buffer."""

    def __init__(self, backend: CpuBackend) -> None:
        ptr = F["ggml_gallocr_new"](backend.default_buffer_type())
        if not ptr:
            raise GgmlError("ggml_gallocr_new failed")
        self.ptr: int = ptr

    def reserve(self, graph: ops.Graph) -> None:
        if not F["ggml_gallocr_reserve"](self.ptr, graph):
            raise GgmlError("ggml_gallocr_reserve failed (out of memory?)")

    def alloc(self, graph: ops.Graph) -> None:
        if not F["ggml_gallocr_alloc_graph"](self.ptr, graph):
            raise GgmlError("ggml_gallocr_alloc_graph failed (out of memory?)")

    @property
    def size(self) -> int:
        return int(F["ggml_gallocr_get_buffer_size"](self.ptr, 0)) if self.ptr else 0

    def close(self) -> None:
        if self.ptr:
            F["ggml_gallocr_free"](self.ptr)
            self.ptr = 0

    def __del__(self) -> None:
        self.close()


def tensor_set(t: ops.Tensor, data: Any, offset: int = 0) -> None:
    """Copy host bytes into a backend tensor. `data` is a C-contiguous numpy array or bytes-like."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("tensor_set needs a C-contiguous array")
        F["ggml_backend_tensor_set"](t, data.ctypes.data, offset, data.nbytes)
        return
    view = memoryview(data)
    size = view.nbytes
    holder = (ctypes.c_char * size).from_buffer(view) if not view.readonly else ctypes.create_string_buffer(
        bytes(view), size
    )
    F["ggml_backend_tensor_set"](t, ctypes.addressof(holder), offset, size)


def tensor_get(t: ops.Tensor, out: np.ndarray, offset: int = 0) -> np.ndarray:
    """Copy a backend tensor's bytes into the C-contiguous array `out` and return it."""
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("tensor_get needs a writeable C-contiguous array")
    F["ggml_backend_tensor_get"](t, out.ctypes.data, offset, out.nbytes)
    return out
