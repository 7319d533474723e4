"""Build the ggml graph of one forward step through a stage's layers.

The structure follows llama.cpp's graph for llama/qwen2/qwen3 (pre-norm decoder,
RMSNorm, RoPE, GQA attention over an f16 KV cache with the mul_mat + soft_max path
that llama.cpp uses when flash attention is off, SwiGLU FFN), so that the same
kernels see the same operands and the numbers agree with llama.cpp's. gemma3 adds,
as llama.cpp's gemma3 graph does: embeddings scaled by sqrt(n_embd), Q scaled before
attention, sliding-window layers (their own mask input and rope base), norms after
attention and after the FFN, a GELU-gated FFN, and optional final logit soft-capping.

Sliding-window layers keep the same full-length cache as global layers and mask what
lies outside the window. The replicas build llama.cpp's separate window cache as long as
the context (swa_full, pinned in node.engines.llamacpp), so it holds each position in the
same cell in the same order, and the attended values and their order agree.

KV cache layout (per layer, all slots in one tensor):
  K: [n_embd_kv, n_ctx * slots]: one row per (slot, position).
  V: transposed per slot, [n_embd_kv rows of n_ctx positions] * slots, so that
     V^T is a plain view and the attention product needs no copy.
New K/V rows are scattered with ggml_set_rows from index inputs, which keeps a
graph independent of the position: a decode graph is reused for every step of a
slot until the attended window (n_kv) grows.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.engines import ggml
from node.engines.ggml import ops
from node.engines.ggml.structs import PREC_F32, TYPE_F16, TYPE_F32, TYPE_I32, TYPE_I64
from node.engines.stage.config import ModelArgs
from node.engines.stage.weights import LayerWeights, StageWeights

F16_SIZE = 2
# ggml_rope_ext extras for models without YaRN: llama.cpp's defaults when no scaling is configured
_EXT_FACTOR = 0.0
_ATTN_FACTOR = 1.0
_BETA_FAST = 32.0
_BETA_SLOW = 1.0


@dataclass
class KvCache:
    k: list[ggml.Tensor]
    v: list[ggml.Tensor]
    n_ctx: int
    slots: int
    ctx: ggml.MetaContext
    buffer: ggml.Buffer

    def close(self) -> None:
        self.buffer.close()
        self.ctx.close()


def new_kv_cache(args: ModelArgs, n_layers: int, n_ctx: int, slots: int, backend: ggml.CpuBackend) -> KvCache:
    ctx = ggml.MetaContext(2 * n_layers + 1)
    k = [ops.new_tensor_2d(ctx.ptr, TYPE_F16, args.n_embd_kv, n_ctx * slots) for _ in range(n_layers)]
    v = [ops.new_tensor_1d(ctx.ptr, TYPE_F16, args.n_embd_kv * n_ctx * slots) for _ in range(n_layers)]
    buffer = ggml.Buffer(ctx, backend, usage=0, huge_pages=True)
    buffer.clear(0)  # masked cells are multiplied by 0; NaN garbage there would still poison the sum
    return KvCache(k=k, v=v, n_ctx=n_ctx, slots=slots, ctx=ctx, buffer=buffer)


@dataclass
class StepGraph:
    """One built graph and its input/output tensors; keeps its metadata context alive."""

    ctx: ggml.MetaContext
    graph: ggml.Graph
    n_tokens: int
    n_kv: int
    slot: int
    inp: ggml.Tensor  # I32 token ids [n_tokens] (first stage) or F32 hidden [n_embd, n_tokens]
    pos: ggml.Tensor  # I32 [n_tokens]
    k_idx: ggml.Tensor  # I64 [n_tokens]: K cache rows to write
    v_idx: ggml.Tensor  # I64 [n_tokens * n_embd_kv]: V cache elements to write
    # F32 [n_kv, n_tokens] of 0 or -inf, for global and for sliding-window layers; None when no layer
    # of the stage needs it (an input no node reads has no buffer)
    mask: ggml.Tensor | None
    mask_swa: ggml.Tensor | None
    out: ggml.Tensor  # F32 [n_embd, n_tokens] hidden, or [n_vocab, 1] logits of the last token

    def close(self) -> None:
        self.ctx.close()


def graph_size(n_layers: int) -> int:
    # ~40 nodes per layer plus head; generous so that a larger layer count never overflows
    return max(1024, 64 * n_layers + 128)


def build_step(args: ModelArgs, w: StageWeights, kv: KvCache, *, n_tokens: int, n_kv: int, slot: int,
               is_first: bool, is_last: bool) -> StepGraph:
    size = graph_size(len(w.layers))
    mctx = ggml.MetaContext(size, graph_size=size)
    c = mctx.ptr
    gf = ops.new_graph_custom(c, size, False)

    if is_first:
        inp = ops.new_tensor_1d(c, TYPE_I32, n_tokens)
        assert w.tok_embd is not None
        x = ops.get_rows(c, w.tok_embd, inp)
        if args.embd_scale != 1.0:
            x = ops.scale(c, x, args.embd_scale)
    else:
        inp = ops.new_tensor_2d(c, TYPE_F32, args.n_embd, n_tokens)
        x = inp
    ops.set_input(inp)
    pos = ops.new_tensor_1d(c, TYPE_I32, n_tokens)
    k_idx = ops.new_tensor_1d(c, TYPE_I64, n_tokens)
    v_idx = ops.new_tensor_1d(c, TYPE_I64, n_tokens * args.n_embd_kv)
    n_layers = len(w.layers)
    swa = [args.is_swa(w.first + i) for i in range(n_layers)]
    mask = ops.new_tensor_2d(c, TYPE_F32, n_kv, n_tokens) if not all(swa) else None
    mask_swa = ops.new_tensor_2d(c, TYPE_F32, n_kv, n_tokens) if any(swa) else None
    for t in (pos, k_idx, v_idx, mask, mask_swa):
        if t is not None:
            ops.set_input(t)

    for i, layer in enumerate(w.layers):
        last_row_only = is_last and i == n_layers - 1
        layer_mask = mask_swa if swa[i] else mask
        assert layer_mask is not None
        x = _layer(args, c, gf, layer, kv, i, x, w.rope_freqs, pos, k_idx, v_idx, layer_mask,
                   n_tokens=n_tokens, n_kv=n_kv, slot=slot, last_row_only=last_row_only, swa=swa[i])

    if is_last:
        assert w.output_norm is not None and w.output is not None
        if n_layers == 0:  # a head-only stage still looks at the last token only
            x = ops.view_2d(c, x, args.n_embd, 1, ggml.strides(x)[1], (n_tokens - 1) * ggml.strides(x)[1])
        h = ops.mul(c, ops.rms_norm(c, x, args.rms_eps), w.output_norm)
        out = ops.mul_mat(c, w.output, h)
        if w.output_b is not None:
            out = ops.add(c, out, w.output_b)
        if args.final_logit_softcap > 0.0:
            cap = args.final_logit_softcap
            out = ops.scale(c, ops.tanh(c, ops.scale(c, out, 1.0 / cap)), cap)
    else:
        out = x
    ops.set_output(out)
    ops.build_forward_expand(gf, out)
    return StepGraph(ctx=mctx, graph=gf, n_tokens=n_tokens, n_kv=n_kv, slot=slot, inp=inp, pos=pos,
                     k_idx=k_idx, v_idx=v_idx, mask=mask, mask_swa=mask_swa, out=out)


def _norm(c: ggml.Context, x: ggml.Tensor, weight: ggml.Tensor, eps: float) -> ggml.Tensor:
    return ops.mul(c, ops.rms_norm(c, x, eps), weight)


def _linear(c: ggml.Context, w: ggml.Tensor, x: ggml.Tensor, b: ggml.Tensor | None) -> ggml.Tensor:
    y = ops.mul_mat(c, w, x)
    return y if b is None else ops.add(c, y, b)


def _layer(args: ModelArgs, c: ggml.Context, gf: ggml.Graph, lw: LayerWeights, kv: KvCache, i: int,
           x: ggml.Tensor, rope_freqs: ggml.Tensor | None, pos: ggml.Tensor, k_idx: ggml.Tensor,
           v_idx: ggml.Tensor, mask: ggml.Tensor, *, n_tokens: int, n_kv: int, slot: int,
           last_row_only: bool, swa: bool) -> ggml.Tensor:
    hd, n_head, n_head_kv = args.head_dim, args.n_head, args.n_head_kv
    h = _norm(c, x, lw.attn_norm, args.rms_eps)

    q = ops.reshape_3d(c, _linear(c, lw.wq, h, lw.bq), hd, n_head, n_tokens)
    k = ops.reshape_3d(c, _linear(c, lw.wk, h, lw.bk), hd, n_head_kv, n_tokens)
    v = _linear(c, lw.wv, h, lw.bv)  # [n_embd_kv, n_tokens]
    if lw.q_norm is not None and lw.k_norm is not None:  # qwen3, gemma3: RMSNorm over each head before RoPE
        q = _norm(c, q, lw.q_norm, args.rms_eps)
        k = _norm(c, k, lw.k_norm, args.rms_eps)
    base, freq_scale = ((args.rope_freq_base_swa, args.rope_freq_scale_swa) if swa
                        else (args.rope_freq_base, args.rope_freq_scale))
    rope = (args.n_rot, args.rope_mode, args.n_ctx_train, base, freq_scale,
            _EXT_FACTOR, _ATTN_FACTOR, _BETA_FAST, _BETA_SLOW)
    q = ops.rope_ext(c, q, pos, rope_freqs, *rope)
    k = ops.rope_ext(c, k, pos, rope_freqs, *rope)
    if args.q_scale != 1.0:  # gemma scales Q itself and then attends with a scale of 1
        q = ops.scale(c, q, args.q_scale)

    # write this step's K and V into the slot's cache rows before attention reads them
    e = args.n_embd_kv
    ops.build_forward_expand(gf, ops.set_rows(c, kv.k[i], ops.reshape_2d(c, k, e, n_tokens), k_idx))
    v_elems = ops.reshape_2d(c, kv.v[i], 1, e * kv.n_ctx * kv.slots)
    ops.build_forward_expand(gf, ops.set_rows(c, v_elems, ops.reshape_2d(c, v, 1, e * n_tokens), v_idx))

    k_row = e * F16_SIZE
    kc = ops.view_3d(c, kv.k[i], hd, n_head_kv, n_kv, hd * F16_SIZE, k_row, slot * kv.n_ctx * k_row)
    vc = ops.view_3d(c, kv.v[i], n_kv, n_head_kv, hd, kv.n_ctx * hd * F16_SIZE, kv.n_ctx * F16_SIZE,
                     slot * kv.n_ctx * e * F16_SIZE)
    qp = ops.permute(c, q, 0, 2, 1, 3)  # [hd, n_tokens, n_head]
    kp = ops.permute(c, kc, 0, 2, 1, 3)  # [hd, n_kv, n_head_kv]
    vp = ops.permute(c, vc, 0, 2, 1, 3)  # [n_kv, hd, n_head_kv]
    kq = ops.mul_mat(c, kp, qp)  # [n_kv, n_tokens, n_head]; query heads share KV heads in groups
    ops.prec_set_acc(kq, PREC_F32)
    kq = ops.soft_max_ext(c, kq, mask, args.attn_scale, 0.0)
    kqv = ops.mul_mat(c, vp, kq)  # [hd, n_tokens, n_head]
    att = ops.cont_2d(c, ops.permute(c, kqv, 0, 2, 1, 3), hd * n_head, n_tokens)
    att = _linear(c, lw.wo, att, lw.bo)

    if last_row_only:
        # the head needs the last token only: skip the FFN of every other row (as llama.cpp's out_ids do)
        att = _last_row(c, att, n_tokens)
        x = _last_row(c, x, n_tokens)
    if lw.attn_post_norm is not None:
        att = _norm(c, att, lw.attn_post_norm, args.rms_eps)
    ffn_inp = ops.add(c, att, x)
    h = _norm(c, ffn_inp, lw.ffn_norm, args.rms_eps)
    gate = ops.mul_mat(c, lw.ffn_gate, h)
    up = ops.mul_mat(c, lw.ffn_up, h)
    gated = ops.geglu_split(c, gate, up) if args.ffn_gelu else ops.swiglu_split(c, gate, up)
    ffn = ops.mul_mat(c, lw.ffn_down, gated)
    if lw.ffn_post_norm is not None:
        ffn = _norm(c, ffn, lw.ffn_post_norm, args.rms_eps)
    return ops.add(c, ffn, ffn_inp)


def _last_row(c: ggml.Context, t: ggml.Tensor, n_tokens: int) -> ggml.Tensor:
    ne0 = ggml.shape(t)[0]
    nb1 = ggml.strides(t)[1]
    return ops.view_2d(c, t, ne0, 1, nb1, (n_tokens - 1) * nb1)
