"""ModelArgs: the architecture hyper-parameters a stage needs, read from GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.errors import ModelError
from node.engines.ggml.structs import ROPE_TYPE_NEOX, ROPE_TYPE_NORMAL

# architecture -> rope mode, as llama.cpp assigns them (llama_model_rope_type)
SUPPORTED_ARCHITECTURES: dict[str, int] = {
    "llama": ROPE_TYPE_NORMAL,
    "qwen2": ROPE_TYPE_NEOX,
    "qwen3": ROPE_TYPE_NEOX,
    "gemma3": ROPE_TYPE_NEOX,
}
# gemma3 without a sliding_window_pattern key: every 6th layer attends globally (llama.cpp's default)
_GEMMA3_SWA_PERIOD = 6
# llama.cpp's rope base for sliding-window layers when the file names none
_DEFAULT_ROPE_FREQ_BASE_SWA = 10000.0


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # per-head size of Q, K and V (llama.cpp asserts they agree for these archs)
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_mode: int
    n_rot: int
    rope_freq_base: float
    rope_freq_scale: float
    attn_scale: float  # applied to QK^T inside soft_max
    # gemma3 (all neutral for llama/qwen): sliding-window attention on some layers, with their own rope
    n_swa: int = 0  # window in positions; 0 = every layer attends to the whole context
    swa_layers: tuple[bool, ...] = ()  # per model layer: True = sliding window
    rope_freq_base_swa: float = _DEFAULT_ROPE_FREQ_BASE_SWA
    rope_freq_scale_swa: float = 1.0
    embd_scale: float = 1.0  # token embeddings are multiplied by this (gemma: sqrt(n_embd))
    q_scale: float = 1.0  # Q is multiplied by this before attention (gemma; attn_scale is then 1)
    ffn_gelu: bool = False  # GELU-gated feed-forward instead of SiLU-gated (SwiGLU)
    final_logit_softcap: float = 0.0  # logits -> c * tanh(logits / c) when > 0

    def is_swa(self, layer: int) -> bool:
        return self.n_swa > 0 and bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


def _scalar(value: Any, key: str) -> Any:
    if isinstance(value, list):
        # per-layer arrays (e.g. head_count_kv for hybrid models) belong to architectures we do not run
        if len(set(value)) != 1:
            raise ModelError(f"{key} varies per layer ({value}); not supported by the stage engine")
        return value[0]
    return value


def model_args_from_metadata(meta: dict[str, Any], n_vocab_tokens: int) -> ModelArgs:
    """Build ModelArgs from a dict of GGUF key -> value, with llama.cpp's defaults for optional keys."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"architecture {arch!r} is not supported by the stage engine; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if default is None:
                raise ModelError(f"GGUF metadata lacks {full}")
            return default
        return _scalar(meta[full], full)

    n_embd = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_k = int(get("attention.key_length", n_embd // n_head))
    head_v = int(get("attention.value_length", n_embd // n_head))
    if head_k != head_v:
        raise ModelError(f"key_length {head_k} != value_length {head_v}: not supported")
    n_rot = int(get("rope.dimension_count", head_k))
    if arch == "llama" and n_rot != head_k:
        raise ModelError(f"llama needs rope.dimension_count == head size, got {n_rot} and {head_k}")

    scaling = str(meta.get(f"{arch}.rope.scaling.type", "linear"))
    if scaling not in ("none", "linear"):
        raise ModelError(f"rope scaling {scaling!r} is not supported by the stage engine (none, linear)")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 0.0)))
    attn_scale = float(meta.get(f"{arch}.attention.scale", 0.0)) if arch == "llama" else 0.0

    n_vocab = int(meta.get(f"{arch}.vocab_size", n_vocab_tokens))
    n_layer = int(get("block_count"))
    gemma = _gemma3_args(meta, n_layer, n_embd, head_k) if arch == "gemma3" else {}
    common: dict[str, Any] = dict(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_k,
        n_ff=int(get("feed_forward_length")),
        n_vocab=n_vocab,
        n_ctx_train=int(get("context_length", 0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_mode=SUPPORTED_ARCHITECTURES[arch],
        n_rot=n_rot,
        rope_freq_base=float(get("rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 if factor == 0.0 else 1.0 / factor,
        attn_scale=attn_scale if attn_scale != 0.0 else 1.0 / math.sqrt(head_k),
    )
    return ModelArgs(**(common | gemma))


def _gemma3_args(meta: dict[str, Any], n_layer: int, n_embd: int, head_k: int) -> dict[str, Any]:
    """What llama.cpp's gemma3 loader sets beyond the common keys (llama_model_gemma3::load_arch_hparams)."""
    for key, value in (("attention.key_length_swa", head_k), ("attention.value_length_swa", head_k),
                       ("rope.dimension_count_swa", head_k)):
        if f"gemma3.{key}" in meta and int(meta[f"gemma3.{key}"]) != value:
            raise ModelError(f"gemma3.{key} = {meta[f'gemma3.{key}']} differs from the global layers' {value}: "
                             "sliding-window layers of another head size are not supported by the stage engine")
    n_swa = int(meta.get("gemma3.attention.sliding_window", 0) or 0)
    swa_layers: tuple[bool, ...] = ()
    if n_swa > 0:
        pattern = meta.get("gemma3.attention.sliding_window_pattern", _GEMMA3_SWA_PERIOD)
        if isinstance(pattern, list):  # one flag per layer (llama.cpp would take missing ones as global)
            if len(pattern) < n_layer:
                raise ModelError(f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries for "
                                 f"{n_layer} layers")
            swa_layers = tuple(bool(v) for v in pattern[:n_layer])
        else:  # a period: the last layer of every period attends globally (0: all layers slide)
            period = int(pattern)
            swa_layers = tuple(period == 0 or il % period < period - 1 for il in range(n_layer))
    if n_layer == 62:  # the 27B model scales by n_embd / n_head instead of the head size (as llama.cpp)
        n_head = int(_scalar(meta["gemma3.attention.head_count"], "gemma3.attention.head_count"))
        q_scale = _f32_rsqrt(n_embd // n_head)
    else:
        q_scale = _f32_rsqrt(head_k)
    return {
        "n_swa": n_swa,
        "swa_layers": swa_layers,
        "rope_freq_base_swa": float(meta.get("gemma3.rope.freq_base_swa", _DEFAULT_ROPE_FREQ_BASE_SWA)),
        "embd_scale": float(np.sqrt(np.float32(n_embd))),
        "q_scale": q_scale,
        "attn_scale": 1.0,
        "ffn_gelu": True,
        "final_logit_softcap": float(meta.get("gemma3.final_logit_softcapping", 0.0) or 0.0),
    }


def _f32_rsqrt(n: int) -> float:
    # computed in float32 as llama.cpp does (1.0f / sqrtf(n)), so the scale is the same float
    return float(np.float32(1.0) / np.sqrt(np.float32(n)))
