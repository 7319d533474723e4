"""C struct layouts and enum values mirrored from ggml.h of llama-cpp-python 0.3.36.

Only the structs we pass by value (ggml_init_params) or whose fields we read
(ggml_tensor: type/ne/nb/data/name) are mirrored. The layouts must match ggml.h
field for field: ctypes has no way to check them, so tests/unit/test_ggml_binding.py
reads the fields back from tensors ggml created and compares them.
"""

from __future__ import annotations

import ctypes

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64

# enum ggml_type (the values are part of the GGUF file format too, so they never change)
TYPE_F32 = 0
TYPE_F16 = 1
TYPE_Q4_0 = 2
TYPE_Q4_1 = 3
TYPE_Q8_0 = 8
TYPE_I32 = 26
TYPE_I64 = 27
TYPE_COUNT = 43  # first invalid value in this ggml version

# rope modes (GGML_ROPE_TYPE_*)
ROPE_TYPE_NORMAL = 0
ROPE_TYPE_NEOX = 2

# enum ggml_prec
PREC_DEFAULT = 0
PREC_F32 = 10

# enum ggml_backend_buffer_usage
BUFFER_USAGE_ANY = 0
BUFFER_USAGE_WEIGHTS = 1
BUFFER_USAGE_COMPUTE = 2

# enum ggml_status
STATUS_SUCCESS = 0


class InitParams(ctypes.Structure):
    """struct ggml_init_params (passed by value to ggml_init)."""

    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


class TensorStruct(ctypes.Structure):
    """struct ggml_tensor. Read-only from Python: ggml owns every instance."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]
