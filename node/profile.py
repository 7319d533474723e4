"""What the planner needs to know about a model, read from its GGUF header (no weights)."""

from __future__ import annotations

import re
from pathlib import Path

from mesh.placement.planner import ModelProfile
from mesh.types import ModelSha
from node.engines.stage.weights import read_header

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def model_profile(path: Path, sha256: str) -> ModelProfile:
    args, tensors = read_header(path)
    layer_bytes = [0] * args.n_layer
    for name, info in tensors.items():
        match = _BLOCK.match(name)
        if match and int(match.group(1)) < args.n_layer:
            layer_bytes[int(match.group(1))] += info.n_bytes
    embed = tensors["token_embd.weight"].n_bytes if "token_embd.weight" in tensors else 0
    # Tied embeddings: the last stage loads the embedding again as its head.
    head = tensors["output.weight"].n_bytes if "output.weight" in tensors else embed
    head += tensors["output_norm.weight"].n_bytes if "output_norm.weight" in tensors else 0
    return ModelProfile(
        sha256=ModelSha(sha256), name=path.stem, file_bytes=path.stat().st_size, layer_bytes=tuple(layer_bytes),
        embed_bytes=embed, head_bytes=head, kv_bytes_per_token_layer=2 * args.n_embd_kv * 2,
        n_embd=args.n_embd, n_head=args.n_head, n_ff=args.n_ff, n_vocab=args.n_vocab)
