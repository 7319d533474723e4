"""The ctypes binding to llama-cpp-python's ggml: symbol checks, struct layout, real computations."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node.engines import ggml
from node.engines.ggml import ops
from node.engines.ggml import structs as S


@pytest.fixture()
def backend() -> Iterator[ggml.CpuBackend]:
    be = ggml.CpuBackend(1)
    yield be
    be.close()


def test_every_symbol_is_bound() -> None:
    assert ggml.check_symbols(ggml.LIBS.libs) == []
    assert set(ggml.required_symbols()) <= set(ggml.LIBS.fns)
    assert ggml.library_dir().name == "lib"


def test_missing_symbols_name_the_expected_version() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    fake = {"base": libc, "cpu": libc, "ggml": libc}
    assert set(ggml.check_symbols(fake)) == set(ggml.required_symbols())
    with pytest.raises(ggml.GgmlBindingError) as info:
        ggml.bind(fake, Path("/nowhere"), "9.9.9")
    message = str(info.value)
    assert ggml.EXPECTED_LLAMA_CPP_PYTHON == "0.3.36"
    assert "llama-cpp-python==0.3.36" in message and "ggml_mul_mat" in message


def test_tensor_struct_layout_matches_ggml(backend: ggml.CpuBackend) -> None:
    ctx = ggml.MetaContext(4)
    try:
        t = ops.new_tensor_3d(ctx.ptr, S.TYPE_Q8_0, 64, 3, 2)
        ops.set_name(t, b"probe")
        st = ggml.tensor_struct(t)
        assert st.type == S.TYPE_Q8_0
        assert ggml.shape(t) == (64, 3, 2, 1)
        row = ops.row_size(S.TYPE_Q8_0, 64)
        assert row == 2 * 34  # two blocks of 32 int8 + f16 scale
        assert ggml.strides(t) == (34, row, 3 * row, 6 * row)
        assert ops.nbytes(t) == 6 * row
        assert st.name == b"probe"
        assert st.data is None and st.buffer is None  # no_alloc context
        buf = ggml.Buffer(ctx, backend, usage=S.BUFFER_USAGE_WEIGHTS)
        assert st.data is not None and st.buffer == buf.ptr
        assert buf.size >= ops.nbytes(t)
        buf.close()
    finally:
        ctx.close()


def test_ops_match_numpy(backend: ggml.CpuBackend) -> None:
    rng = np.random.default_rng(1)
    wctx = ggml.MetaContext(4)
    a = ops.new_tensor_2d(wctx.ptr, S.TYPE_F32, 32, 5)  # numpy (5, 32)
    b = ops.new_tensor_2d(wctx.ptr, S.TYPE_F32, 32, 7)  # numpy (7, 32)
    h = ops.new_tensor_2d(wctx.ptr, S.TYPE_F16, 32, 5)
    buf = ggml.Buffer(wctx, backend, usage=S.BUFFER_USAGE_WEIGHTS)
    A = rng.normal(size=(5, 32)).astype(np.float32)
    B = rng.normal(size=(7, 32)).astype(np.float32)
    ggml.tensor_set(a, A)
    ggml.tensor_set(b, B)
    ggml.tensor_set(h, A.astype(np.float16))

    gctx = ggml.MetaContext(64, graph_size=64)
    c = gctx.ptr
    gf = ops.new_graph_custom(c, 64, False)
    mm = ops.mul_mat(c, a, b)  # [5, 7] in ggml = numpy (7, 5) = B @ A.T
    sm = ops.soft_max_ext(c, mm, None, 0.5, 0.0)
    nr = ops.rms_norm(c, b, 1e-6)
    sw = ops.swiglu_split(c, b, b)
    mh = ops.mul_mat(c, h, b)  # f16 weights: b is rounded to f16 as in llama.cpp's KQ product
    tr = ops.cont(c, ops.transpose(c, a))
    for t in (mm, sm, nr, sw, mh, tr):
        ops.set_output(t)
        ops.build_forward_expand(gf, t)
    alloc = ggml.GraphAllocator(backend)
    try:
        alloc.alloc(gf)
        backend.compute(gf)
        want = B @ A.T
        np.testing.assert_allclose(ggml.tensor_get(mm, np.empty((7, 5), np.float32)), want, rtol=1e-5, atol=1e-5)
        e = np.exp(0.5 * want - (0.5 * want).max(axis=1, keepdims=True))
        np.testing.assert_allclose(ggml.tensor_get(sm, np.empty((7, 5), np.float32)),
                                   e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
        rms = B / np.sqrt((B * B).mean(axis=1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(ggml.tensor_get(nr, np.empty((7, 32), np.float32)), rms, rtol=1e-5, atol=1e-5)
        silu = B / (1 + np.exp(-B))
        np.testing.assert_allclose(ggml.tensor_get(sw, np.empty((7, 32), np.float32)), silu * B,
                                   rtol=1e-4, atol=1e-5)
        want_h = B.astype(np.float16).astype(np.float32) @ A.astype(np.float16).astype(np.float32).T
        np.testing.assert_allclose(ggml.tensor_get(mh, np.empty((7, 5), np.float32)), want_h, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(ggml.tensor_get(tr, np.empty((32, 5), np.float32)), A.T)
        assert alloc.size > 0 and ops.graph_n_nodes(gf) == 7  # the transpose view is a node too
    finally:
        alloc.close()
        gctx.close()
        buf.close()
        wctx.close()


def test_close_is_idempotent() -> None:
    be = ggml.CpuBackend(2)
    assert be.threads == 2
    be.set_threads(1)
    be.close()
    be.close()
    with pytest.raises(ValueError):
        ggml.CpuBackend(0)
