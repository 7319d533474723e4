"""Typed names for the ggml C functions the stage engine calls.

Each name is the ctypes function itself, annotated with a Callable type: mypy checks
the call sites while Python pays no wrapper call on the graph-building path. Pointers
are plain ints (see _lib); NULL comes back as None, which callers never get for ops
on valid inputs because ggml aborts the process instead of returning NULL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NewType

from node.engines.ggml._lib import F

Context = NewType("Context", int)  # struct ggml_context *
Tensor = NewType("Tensor", int)  # struct ggml_tensor *
Graph = NewType("Graph", int)  # struct ggml_cgraph *

_T = Tensor
_C = Context

tensor_overhead: Callable[[], int] = F["ggml_tensor_overhead"]
graph_overhead_custom: Callable[[int, bool], int] = F["ggml_graph_overhead_custom"]
new_tensor_1d: Callable[[_C, int, int], _T] = F["ggml_new_tensor_1d"]
new_tensor_2d: Callable[[_C, int, int, int], _T] = F["ggml_new_tensor_2d"]
new_tensor_3d: Callable[[_C, int, int, int, int], _T] = F["ggml_new_tensor_3d"]
set_name: Callable[[_T, bytes], _T] = F["ggml_set_name"]
set_input: Callable[[_T], None] = F["ggml_set_input"]
set_output: Callable[[_T], None] = F["ggml_set_output"]
nbytes: Callable[[_T], int] = F["ggml_nbytes"]
row_size: Callable[[int, int], int] = F["ggml_row_size"]
type_size: Callable[[int], int] = F["ggml_type_size"]
blck_size: Callable[[int], int] = F["ggml_blck_size"]

get_rows: Callable[[_C, _T, _T], _T] = F["ggml_get_rows"]
set_rows: Callable[[_C, _T, _T, _T], _T] = F["ggml_set_rows"]  # (destination, source f32, I64 row ids)
rms_norm: Callable[[_C, _T, float], _T] = F["ggml_rms_norm"]
mul: Callable[[_C, _T, _T], _T] = F["ggml_mul"]
add: Callable[[_C, _T, _T], _T] = F["ggml_add"]
scale: Callable[[_C, _T, float], _T] = F["ggml_scale"]
mul_mat: Callable[[_C, _T, _T], _T] = F["ggml_mul_mat"]
prec_set_acc: Callable[[_T, int], bool] = F["ggml_prec_set_acc"]
# (ctx, a, positions, freq_factors|None, n_dims, mode, n_ctx_orig, freq_base, freq_scale,
#  ext_factor, attn_factor, beta_fast, beta_slow)
rope_ext: Callable[[_C, _T, _T, _T | None, int, int, int, float, float, float, float, float, float], _T] = F[
    "ggml_rope_ext"
]
reshape_2d: Callable[[_C, _T, int, int], _T] = F["ggml_reshape_2d"]
reshape_3d: Callable[[_C, _T, int, int, int], _T] = F["ggml_reshape_3d"]
view_1d: Callable[[_C, _T, int, int], _T] = F["ggml_view_1d"]
view_2d: Callable[[_C, _T, int, int, int, int], _T] = F["ggml_view_2d"]  # ne0, ne1, nb1, offset
view_3d: Callable[[_C, _T, int, int, int, int, int, int], _T] = F["ggml_view_3d"]  # ne0..2, nb1, nb2, offset
permute: Callable[[_C, _T, int, int, int, int], _T] = F["ggml_permute"]
transpose: Callable[[_C, _T], _T] = F["ggml_transpose"]
cont: Callable[[_C, _T], _T] = F["ggml_cont"]
cont_2d: Callable[[_C, _T, int, int], _T] = F["ggml_cont_2d"]
cpy: Callable[[_C, _T, _T], _T] = F["ggml_cpy"]
soft_max_ext: Callable[[_C, _T, _T | None, float, float], _T] = F["ggml_soft_max_ext"]  # mask, scale, max_bias
silu: Callable[[_C, _T], _T] = F["ggml_silu"]
swiglu_split: Callable[[_C, _T, _T], _T] = F["ggml_swiglu_split"]  # silu(a) * b
geglu_split: Callable[[_C, _T, _T], _T] = F["ggml_geglu_split"]  # gelu(a) * b
tanh: Callable[[_C, _T], _T] = F["ggml_tanh"]

new_graph_custom: Callable[[_C, int, bool], Graph] = F["ggml_new_graph_custom"]
build_forward_expand: Callable[[Graph, _T], None] = F["ggml_build_forward_expand"]
graph_n_nodes: Callable[[Graph], int] = F["ggml_graph_n_nodes"]
