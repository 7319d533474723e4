"""Embeddings on llama.cpp: one context in embedding mode over the replica's own file.

llama.cpp maps the file, so this context shares the weights with the generation slots; what
it adds is its own KV cache and compute buffers (counted in the node's budget: see
node.replica_host). Each input is evaluated alone, as one sequence in one batch, exactly as
llama-cpp-python's `Llama.embed` evaluates a single input, so a vector equals what llama.cpp
gives for the same tokens whichever node computed it and whatever else was in the request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidInput, ModelError
from mesh.llama_runtime import install
from mesh.types import EMBED_BATCH_INPUTS, EmbedBatch

log = logging.getLogger(__name__)

# llama.cpp's enum llama_pooling_type, as GGUF's `<arch>.pooling_type` stores it.
POOLING_NAMES = {1: "mean", 2: "cls", 3: "last"}
MEAN = 1


def declared_pooling(metadata: Mapping[str, str]) -> int:
    """The pooling the file declares (an embedding model's, such as cls for BERT-likes), else mean:
    a generative model declares none (or NONE, one vector per token, which is not an embedding)."""
    arch = metadata.get("general.architecture", "")
    try:
        value = int(metadata.get(f"{arch}.pooling_type", MEAN))
    except ValueError:
        return MEAN
    return value if value in POOLING_NAMES else MEAN


def embedding_bytes(kv_bytes_per_token_layer: int, n_layers: int, n_head: int, n_embd: int, n_vocab: int,
                    n_ctx: int) -> int:
    """What the embedding context adds to the mapped weights: its KV cache, the attention scores of
    one whole input (f32, n_head x n_ctx x n_ctx: no flash attention, as the replica's slots), the
    logits llama.cpp computes for every output token (in the graph, then in its output buffer) and
    the activations, plus a margin for llama.cpp's own buffers. On SmolLM2-135M at 512 tokens this
    says 297 MiB; measured beside a loaded replica: 323 MiB more resident after a 512-token input,
    about 97 of them the second mapping of the weights (pages the replica's mapping holds already)."""
    kv = kv_bytes_per_token_layer * n_ctx * n_layers
    scores = 4 * n_head * n_ctx * n_ctx
    logits = 2 * 4 * (n_vocab + n_embd) * n_ctx
    activations = 4 * 16 * n_embd * n_ctx
    return kv + scores + logits + activations + 64 * 2**20


def _no_chat_formatting(**_kwargs: Any) -> NoReturn:
    """llama-cpp-python's chat handler, never used: this context takes token ids, and chats are
    rendered by the gateway's sandboxed renderer (mesh.tokenizer)."""
    raise InvalidInput("the embedding context takes token ids; it formats no chats")


class Embedder:
    """A llama.cpp context with embeddings on and the model's pooling; one input at a time."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, n_vocab: int,
                 metadata: Mapping[str, str]) -> None:
        from llama_cpp import Llama

        install()  # the weights in plain buffers, as every model here (mesh.llama_runtime)
        self.pooling = declared_pooling(metadata)
        self.n_ctx = n_ctx
        self.n_vocab = n_vocab
        try:
            # n_batch = n_ubatch = the context: a pooled input must be evaluated in one ubatch.
            self._llm: Any = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=threads, n_threads_batch=threads, embedding=True,
                                   pooling_type=self.pooling, flash_attn=False, chat_handler=_no_chat_formatting,
                                   verbose=False)
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not open {model_path} for embeddings: {exc}") from exc
        self.n_embd = int(self._llm.n_embd())
        self._lock = threading.Lock()
        log.info("embedding context on %s: %s pooling, context %d, width %d", model_path.name,
                 POOLING_NAMES[self.pooling], n_ctx, self.n_embd)

    @property
    def pooling_name(self) -> str:
        return POOLING_NAMES[self.pooling]

    def validate(self, batch: EmbedBatch) -> None:
        if not batch.inputs:
            raise InvalidInput("inputs is empty")
        if len(batch.inputs) > EMBED_BATCH_INPUTS:
            raise InvalidInput(f"at most {EMBED_BATCH_INPUTS} inputs per Embed call, not {len(batch.inputs)}")
        for index, tokens in enumerate(batch.inputs):
            if not tokens:
                raise InvalidInput(f"inputs[{index}] is empty")
            if len(tokens) > self.n_ctx:
                raise InvalidInput(f"inputs[{index}] is {len(tokens)} tokens; the context holds {self.n_ctx}")
            bad = [t for t in tokens if not 0 <= t < self.n_vocab]
            if bad:
                raise InvalidInput(f"inputs[{index}]: token id {bad[0]} is outside the vocabulary of {self.n_vocab}")

    def embed_one(self, tokens: tuple[int, ...]) -> npt.NDArray[np.float32]:
        """The pooled, L2-normalized vector of one input (blocking: run it on the compute thread).

        llama-cpp-python's public `embed` takes text; these are token ids already (the gateway
        tokenized them), so this drives the same batch and context objects `embed` drives."""
        import llama_cpp

        with self._lock:
            batch, ctx = self._llm._batch, self._llm._ctx
            batch.reset()
            batch.add_sequence(list(tokens), 0, True)
            ctx.kv_cache_clear()
            ctx.decode(batch)
            pointer = llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)
            vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float32)
            batch.reset()
            ctx.kv_cache_clear()
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector
