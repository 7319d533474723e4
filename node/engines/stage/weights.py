"""Load the tensors of one layer range from a GGUF file into a ggml backend buffer.

Only the bytes of the tensors the stage runs are read (positioned reads at each
tensor's offset), and quantized tensors keep their GGUF type: ggml runs the same
quantized kernels llama.cpp would.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mesh.errors import ModelError
from node.engines import ggml
from node.engines.ggml import ops, placement
from node.engines.ggml.structs import BUFFER_USAGE_WEIGHTS, TYPE_COUNT
from node.engines.stage.config import ModelArgs, model_args_from_metadata
from node.gguf_header import read_gguf_header

log = logging.getLogger(__name__)

_READ_CHUNK = 16 * 1024 * 1024
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    n_bytes: int
    offset: int  # absolute file offset


@dataclass
class LayerWeights:
    attn_norm: ggml.Tensor
    wq: ggml.Tensor
    wk: ggml.Tensor
    wv: ggml.Tensor
    wo: ggml.Tensor
    ffn_norm: ggml.Tensor
    ffn_gate: ggml.Tensor
    ffn_up: ggml.Tensor
    ffn_down: ggml.Tensor
    bq: ggml.Tensor | None = None
    bk: ggml.Tensor | None = None
    bv: ggml.Tensor | None = None
    bo: ggml.Tensor | None = None
    q_norm: ggml.Tensor | None = None
    k_norm: ggml.Tensor | None = None
    attn_post_norm: ggml.Tensor | None = None  # gemma: RMSNorm of the attention output
    ffn_post_norm: ggml.Tensor | None = None  # gemma: RMSNorm of the feed-forward output


@dataclass
class StageWeights:
    layers: list[LayerWeights]
    first: int  # model index of layers[0] (per-layer settings such as sliding windows follow it)
    tok_embd: ggml.Tensor | None = None
    output_norm: ggml.Tensor | None = None
    output: ggml.Tensor | None = None
    output_b: ggml.Tensor | None = None
    rope_freqs: ggml.Tensor | None = None
    ctxs: list[ggml.MetaContext] = field(default_factory=list)
    buffers: list[ggml.Buffer] = field(default_factory=list)  # one per buffer type (see _buffer_type)
    tensor_bytes: int = 0  # sum of the GGUF tensor sizes loaded
    names: list[str] = field(default_factory=list)
    repacked: list[str] = field(default_factory=list)  # weights in a CPU extra (repacked) buffer type

    @property
    def buffer_bytes(self) -> int:
        return sum(b.size for b in self.buffers)

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()
        for ctx in self.ctxs:
            ctx.close()


def read_header(path: Path) -> tuple[ModelArgs, dict[str, TensorInfo]]:
    """Architecture hyper-parameters and the tensor directory (absolute offsets, byte sizes) of a GGUF file."""
    meta, entries, data_start = read_gguf_header(path)
    arch = str(meta.get("general.architecture", ""))
    n_vocab_tokens = meta.get("tokenizer.ggml.tokens", 0)
    args = model_args_from_metadata(
        {k: v for k, v in meta.items() if k == "general.architecture" or k.startswith(f"{arch}.")},
        int(n_vocab_tokens) if isinstance(n_vocab_tokens, int) else 0,
    )
    file_size = path.stat().st_size
    tensors: dict[str, TensorInfo] = {}
    for name, ggml_type, shape, offset in entries:
        if not 0 <= ggml_type < TYPE_COUNT or not shape or ops.blck_size(ggml_type) == 0:
            raise ModelError(f"tensor {name} has unsupported type {ggml_type} or shape {shape}")
        rows = 1
        for d in shape[1:]:
            rows *= d
        n_bytes = ops.row_size(ggml_type, shape[0]) * rows
        if data_start + offset + n_bytes > file_size:
            raise ModelError(f"{path} is truncated: tensor {name} lies past the end of the file")
        tensors[name] = TensorInfo(name=name, ggml_type=ggml_type, shape=shape, n_bytes=n_bytes,
                                   offset=data_start + offset)
    if args.n_vocab == 0 and "token_embd.weight" in tensors:
        args = _with_vocab(args, tensors["token_embd.weight"].shape[1])
    return args, tensors


def _with_vocab(args: ModelArgs, n_vocab: int) -> ModelArgs:
    from dataclasses import replace

    return replace(args, n_vocab=n_vocab)


def needed_tensors(args: ModelArgs, tensors: dict[str, TensorInfo], first: int, last: int) -> list[str]:
    names: list[str] = []
    for name in tensors:
        m = _LAYER.match(name)
        if m and first <= int(m.group(1)) < last:
            names.append(name)
    if "rope_freqs.weight" in tensors and last > first:
        names.append("rope_freqs.weight")
    if first == 0:
        names.append("token_embd.weight")
    if last == args.n_layer:
        names.append("output_norm.weight")
        if "output.weight" in tensors:
            names.append("output.weight")
        elif "token_embd.weight" not in names:
            names.append("token_embd.weight")  # tied embeddings: the head reuses the embedding matrix
        if "output.bias" in tensors:
            names.append("output.bias")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ModelError(f"GGUF file lacks tensors {missing}")
    return names


# The key under which a tied head's own copy of the embedding is loaded (see load_weights).
_TIED_HEAD = "output.weight"


def load_weights(path: Path, args: ModelArgs, tensors: dict[str, TensorInfo], first: int, last: int,
                 backend: ggml.CpuBackend) -> StageWeights:
    names = needed_tensors(args, tensors, first, last)
    for name in names:
        info = tensors[name]
        if not 0 <= info.ggml_type < TYPE_COUNT or len(info.shape) > 3:
            raise ModelError(f"tensor {name} has unsupported type {info.ggml_type} or rank {len(info.shape)}")
    # What to load: key in `made` -> tensor of the file, each in the buffer type llama.cpp gives it.
    sources = {name: name for name in names}
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(_buffer_type(name, tensors[name]), []).append(name)
    tied = "output.weight" not in tensors
    if tied and last == args.n_layer:
        # llama.cpp loads a tied head as a duplicate of the embedding placed for a matrix product:
        # where that is a repacked type, the head is a second, repacked copy (the lookup keeps the plain one)
        head_buft = _buffer_type(_TIED_HEAD, tensors["token_embd.weight"])
        if head_buft is not None:
            sources[_TIED_HEAD] = "token_embd.weight"
            groups.setdefault(head_buft, []).append(_TIED_HEAD)
    made: dict[str, ggml.Tensor] = {}
    ctxs: list[ggml.MetaContext] = []
    buffers: list[ggml.Buffer] = []
    try:
        for buft, group in groups.items():
            ctx = ggml.MetaContext(len(group) + 1)
            ctxs.append(ctx)
            for key in group:
                made[key] = _new_weight(ctx, key, tensors[sources[key]])
            buffers.append(ggml.Buffer(ctx, backend, usage=BUFFER_USAGE_WEIGHTS, buffer_type=buft, huge_pages=True))
            if buft is not None:
                log.debug("%s in %s", ", ".join(group), placement.buffer_type_name(buft))
        whole = {key for buft, group in groups.items() if buft is not None for key in group}
        total = _read_into(path, sources, tensors, made, whole=whole)
        layers = [_layer_weights(args, made, il) for il in range(first, last)]
    except BaseException:
        for buffer in buffers:
            buffer.close()
        for ctx in ctxs:
            ctx.close()
        raise

    if last == args.n_layer:
        output: ggml.Tensor | None = made.get(_TIED_HEAD) or made["token_embd.weight"]
    else:
        output = None
    log.info("loaded %d tensors (%.1f MB) of layers [%d, %d) from %s", len(names), total / 1e6, first, last, path.name)
    return StageWeights(
        layers=layers,
        first=first,
        tok_embd=made.get("token_embd.weight") if first == 0 else None,
        output_norm=made.get("output_norm.weight"),
        output=output,
        output_b=made.get("output.bias"),
        rope_freqs=made.get("rope_freqs.weight"),
        ctxs=ctxs,
        buffers=buffers,
        tensor_bytes=total,
        names=names,
        repacked=sorted(whole),
    )


def _layer_weights(args: ModelArgs, made: dict[str, ggml.Tensor], il: int) -> LayerWeights:
    p = f"blk.{il}."

    def opt(name: str) -> ggml.Tensor | None:
        return made.get(p + name)

    try:
        lw = LayerWeights(
            attn_norm=made[p + "attn_norm.weight"], wq=made[p + "attn_q.weight"],
            wk=made[p + "attn_k.weight"], wv=made[p + "attn_v.weight"], wo=made[p + "attn_output.weight"],
            ffn_norm=made[p + "ffn_norm.weight"], ffn_gate=made[p + "ffn_gate.weight"],
            ffn_up=made[p + "ffn_up.weight"], ffn_down=made[p + "ffn_down.weight"],
            bq=opt("attn_q.bias"), bk=opt("attn_k.bias"), bv=opt("attn_v.bias"), bo=opt("attn_output.bias"),
            q_norm=opt("attn_q_norm.weight"), k_norm=opt("attn_k_norm.weight"),
            attn_post_norm=opt("post_attention_norm.weight"), ffn_post_norm=opt("post_ffw_norm.weight"),
        )
    except KeyError as exc:
        raise ModelError(f"layer {il} lacks tensor {exc.args[0]} (fused QKV or MoE layers are not supported)") from exc
    if args.arch == "qwen3" and (lw.q_norm is None or lw.k_norm is None):
        raise ModelError(f"qwen3 layer {il} lacks attn_q_norm/attn_k_norm")
    if args.arch == "gemma3" and None in (lw.q_norm, lw.k_norm, lw.attn_post_norm, lw.ffn_post_norm):
        raise ModelError(f"gemma3 layer {il} lacks one of attn_q_norm, attn_k_norm, post_attention_norm, "
                         "post_ffw_norm")
    return lw


def _buffer_type(name: str, info: TensorInfo) -> int | None:
    """The CPU extra buffer type llama.cpp loads this weight into, None for the plain buffer.
    Only matrices that a matrix product reads qualify; the token embedding is read by a row
    lookup, which no repacked type serves (a tied head gets its own copy: see load_weights)."""
    if len(info.shape) < 2 or name == "token_embd.weight":
        return None
    probe = ggml.MetaContext(1)
    try:
        return placement.extra_buffer_type_for_matmul(_new_weight(probe, name, info))
    finally:
        probe.close()


def _new_weight(ctx: ggml.MetaContext, name: str, info: TensorInfo) -> ggml.Tensor:
    shape = list(info.shape) + [1] * (3 - len(info.shape))
    t = ops.new_tensor_3d(ctx.ptr, info.ggml_type, shape[0], shape[1], shape[2])
    if ops.nbytes(t) != info.n_bytes:
        raise ModelError(f"tensor {name}: GGUF says {info.n_bytes} bytes, ggml expects {ops.nbytes(t)}")
    ops.set_name(t, name.encode()[:63])
    return t


def _read_into(path: Path, sources: dict[str, str], tensors: dict[str, TensorInfo], made: dict[str, ggml.Tensor],
               whole: set[str]) -> int:
    """Positioned reads of each file tensor's bytes into the backend tensor(s) loaded from it.
    Tensors in `whole` are set in one call: a repacking buffer converts a tensor only as a whole."""
    total = 0
    with path.open("rb") as f:
        for name, source in sources.items():
            info = tensors[source]
            step = info.n_bytes if name in whole else _READ_CHUNK
            done = 0
            while done < info.n_bytes:
                n = min(step, info.n_bytes - done)
                chunk = np.empty(n, dtype=np.uint8)
                f.seek(info.offset + done)
                if f.readinto(chunk.data) != n:
                    raise ModelError(f"{path} is truncated inside tensor {name}")
                ggml.tensor_set(made[name], chunk, done)
                done += n
            total += info.n_bytes
    return total
