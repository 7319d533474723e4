"""Load the ggml shared libraries that llama-cpp-python ships, and declare the C signatures we use.

We bind the exact libraries llama.cpp itself runs on, so a stage uses the same kernels
(and the same OpenMP thread pool) as a whole-model replica. The libraries are found
through the installed package's location, without importing llama_cpp (which would
load libllama and initialise its backends for nothing).

Every C pointer is declared as c_void_p, so pointers travel through Python as plain
ints: cheaper than ctypes pointer objects on the per-step graph-building path.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from node.engines.ggml.structs import InitParams

log = logging.getLogger(__name__)

EXPECTED_LLAMA_CPP_PYTHON = "0.3.36"

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_i32 = ctypes.c_int
_f32 = ctypes.c_float
_sz = ctypes.c_size_t
_bool = ctypes.c_bool

# name -> (library, restype, argtypes). Library: "base" (libggml-base), "cpu" (libggml-cpu).
_SIGNATURES: dict[str, tuple[str, Any, list[Any]]] = {
    # context and tensors
    "ggml_init": ("base", _p, [InitParams]),
    "ggml_free": ("base", None, [_p]),
    "ggml_tensor_overhead": ("base", _sz, []),
    "ggml_graph_overhead_custom": ("base", _sz, [_sz, _bool]),
    "ggml_new_tensor_1d": ("base", _p, [_p, _i32, _i64]),
    "ggml_new_tensor_2d": ("base", _p, [_p, _i32, _i64, _i64]),
    "ggml_new_tensor_3d": ("base", _p, [_p, _i32, _i64, _i64, _i64]),
    "ggml_set_name": ("base", _p, [_p, ctypes.c_char_p]),
    "ggml_set_input": ("base", None, [_p]),
    "ggml_set_output": ("base", None, [_p]),
    "ggml_nbytes": ("base", _sz, [_p]),
    "ggml_row_size": ("base", _sz, [_i32, _i64]),
    "ggml_type_size": ("base", _sz, [_i32]),
    "ggml_blck_size": ("base", _i64, [_i32]),
    "ggml_type_name": ("base", ctypes.c_char_p, [_i32]),
    # ops
    "ggml_get_rows": ("base", _p, [_p, _p, _p]),
    "ggml_set_rows": ("base", _p, [_p, _p, _p, _p]),
    "ggml_rms_norm": ("base", _p, [_p, _p, _f32]),
    "ggml_mul": ("base", _p, [_p, _p, _p]),
    "ggml_add": ("base", _p, [_p, _p, _p]),
    "ggml_scale": ("base", _p, [_p, _p, _f32]),
    "ggml_mul_mat": ("base", _p, [_p, _p, _p]),
    "ggml_prec_set_acc": ("base", _bool, [_p, _i32]),
    "ggml_rope_ext": ("base", _p, [_p, _p, _p, _p, _i32, _i32, _i32, _f32, _f32, _f32, _f32, _f32, _f32]),
    "ggml_reshape_2d": ("base", _p, [_p, _p, _i64, _i64]),
    "ggml_reshape_3d": ("base", _p, [_p, _p, _i64, _i64, _i64]),
    "ggml_view_1d": ("base", _p, [_p, _p, _i64, _sz]),
    "ggml_view_2d": ("base", _p, [_p, _p, _i64, _i64, _sz, _sz]),
    "ggml_view_3d": ("base", _p, [_p, _p, _i64, _i64, _i64, _sz, _sz, _sz]),
    "ggml_permute": ("base", _p, [_p, _p, _i32, _i32, _i32, _i32]),
    "ggml_transpose": ("base", _p, [_p, _p]),
    "ggml_cont": ("base", _p, [_p, _p]),
    "ggml_cont_2d": ("base", _p, [_p, _p, _i64, _i64]),
    "ggml_cpy": ("base", _p, [_p, _p, _p]),
    "ggml_soft_max_ext": ("base", _p, [_p, _p, _p, _f32, _f32]),
    "ggml_silu": ("base", _p, [_p, _p]),
    "ggml_swiglu_split": ("base", _p, [_p, _p, _p]),
    "ggml_geglu_split": ("base", _p, [_p, _p, _p]),
    "ggml_tanh": ("base", _p, [_p, _p]),
    # graphs
    "ggml_new_graph_custom": ("base", _p, [_p, _sz, _bool]),
    "ggml_build_forward_expand": ("base", None, [_p, _p]),
    "ggml_graph_n_nodes": ("base", _i32, [_p]),
    # backend (generic part lives in libggml-base)
    "ggml_backend_free": ("base", None, [_p]),
    "ggml_backend_get_default_buffer_type": ("base", _p, [_p]),
    "ggml_backend_graph_compute": ("base", _i32, [_p, _p]),
    "ggml_backend_alloc_ctx_tensors": ("base", _p, [_p, _p]),
    "ggml_backend_buffer_free": ("base", None, [_p]),
    "ggml_backend_buffer_get_size": ("base", _sz, [_p]),
    "ggml_backend_buffer_get_base": ("base", _p, [_p]),
    "ggml_backend_buffer_set_usage": ("base", None, [_p, _i32]),
    "ggml_backend_buffer_clear": ("base", None, [_p, ctypes.c_uint8]),
    "ggml_backend_tensor_set": ("base", None, [_p, _p, _sz, _sz]),
    "ggml_backend_tensor_get": ("base", None, [_p, _p, _sz, _sz]),
    "ggml_gallocr_new": ("base", _p, [_p]),
    "ggml_gallocr_free": ("base", None, [_p]),
    "ggml_gallocr_reserve": ("base", _bool, [_p, _p]),
    "ggml_gallocr_alloc_graph": ("base", _bool, [_p, _p]),
    "ggml_gallocr_get_buffer_size": ("base", _sz, [_p, _i32]),
    # buffer types and devices: placing weights in the CPU's extra (repacked) buffer types
    "ggml_backend_alloc_ctx_tensors_from_buft": ("base", _p, [_p, _p]),
    "ggml_backend_buft_alloc_buffer": ("base", _p, [_p, _sz]),
    "ggml_backend_buft_name": ("base", ctypes.c_char_p, [_p]),
    "ggml_backend_reg_dev_get": ("base", _p, [_p, _sz]),
    "ggml_backend_reg_get_proc_address": ("base", _p, [_p, ctypes.c_char_p]),
    "ggml_backend_dev_supports_op": ("base", _bool, [_p, _p]),
    # CPU backend
    "ggml_backend_cpu_reg": ("cpu", _p, []),
    "ggml_backend_cpu_init": ("cpu", _p, []),
    "ggml_backend_cpu_set_n_threads": ("cpu", None, [_p, _i32]),
}


class GgmlBindingError(ImportError):
    """The installed ggml libraries are missing or do not match this binding."""


def library_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GgmlBindingError(
            f"llama-cpp-python is not installed; the stage engine needs llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _installed_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Libs:
    """The loaded libraries with every function in _SIGNATURES typed and checked."""

    def __init__(self) -> None:
        directory = library_dir()
        version = _installed_version()
        if version != EXPECTED_LLAMA_CPP_PYTHON:
            # Struct layouts are mirrored from one ggml.h; another version may still load but is untested.
            log.warning("ggml binding written for llama-cpp-python %s, found %s",
                        EXPECTED_LLAMA_CPP_PYTHON, version)
        libs: dict[str, ctypes.CDLL] = {}
        # Order matters: libggml-cpu resolves symbols from libggml-base; RTLD_GLOBAL makes them visible.
        for key, name in (("base", "libggml-base.so"), ("cpu", "libggml-cpu.so"), ("ggml", "libggml.so")):
            path = directory / name
            try:
                libs[key] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                raise GgmlBindingError(
                    f"cannot load {path} ({exc}); the stage engine needs llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON}"
                ) from exc
        self.fns = bind(libs, directory, version)
        self.libs = libs
        self.directory = directory
        self.version = version


def bind(libs: dict[str, ctypes.CDLL], directory: Path, version: str) -> dict[str, Any]:
    """Type every function of the signature table; raise GgmlBindingError naming all missing symbols."""
    missing = check_symbols(libs)
    if missing:
        raise GgmlBindingError(
            f"the ggml libraries in {directory} (llama-cpp-python {version}) lack {', '.join(sorted(missing))}; "
            f"this binding expects llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON}"
        )
    fns: dict[str, Any] = {}
    for name, (lib, restype, argtypes) in _SIGNATURES.items():
        fn = getattr(libs[lib], name)
        fn.restype = restype
        fn.argtypes = argtypes
        fns[name] = fn
    return fns


def required_symbols() -> tuple[str, ...]:
    return tuple(_SIGNATURES)


def check_symbols(libraries: dict[str, ctypes.CDLL]) -> list[str]:
    """Names from the signature table that `libraries` (keyed "base"/"cpu") do not export."""
    return [name for name, (lib, _, _) in _SIGNATURES.items() if not hasattr(libraries[lib], name)]


LIBS = _Libs()
F: dict[str, Any] = LIBS.fns
