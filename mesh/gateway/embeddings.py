"""/v1/embeddings: OpenAI's request and answer shapes over the replicas' Embed RPC.

The gateway tokenizes (as completions do), checks the limits, splits the inputs into
batches of EMBED_BATCH_INPUTS and lets the scheduler spread the batches over the replicas
(one that fails before answering is replaced by another). Pipeline stages do not embed: a
mesh without a replica says so (503).
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from starlette.responses import JSONResponse, Response

from mesh.config import Limits
from mesh.errors import EdgeMeshError, InvalidInput, Unavailable
from mesh.gateway.answers import MESH_ROUTE
from mesh.gateway.completions import counted_error
from mesh.gateway.policy import GatewayPolicy
from mesh.gateway.schemas import _Strict
from mesh.metrics import GatewayMetrics
from mesh.scheduler import NO_EMBEDDER, Scheduler, check_model
from mesh.tokenizer import Tokenizer
from mesh.types import EMBED_BATCH_INPUTS, EMBED_CONTEXT_TOKENS, EmbedBatch, RequestId


class EmbeddingRequest(_Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: Any = None  # informational

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == [] or value == "":
            raise ValueError("input is empty; send a string, a list of strings or token ids")
        return value

    def items(self) -> list[str | list[int]]:
        """One entry per input: a text, or token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, int) for v in value):
            return [list(value)]  # type: ignore[arg-type]  # one input given as token ids
        return list(value)  # type: ignore[arg-type]

    def texts(self) -> list[str]:
        return [v for v in self.items() if isinstance(v, str)]


class Embeddings:
    """Answers /v1/embeddings (and, reshaped, Ollama's /api/embed)."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, model_name: str, n_embd: int,
                 metrics: GatewayMetrics, limits: Limits, admin: GatewayPolicy,
                 aliases: frozenset[str] = frozenset()) -> None:
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._model_name = model_name
        self.n_embd = n_embd
        self._metrics = metrics
        self._limits = limits
        self._admin = admin
        self._aliases = aliases

    def _tokens(self, items: list[str | list[int]], n_ctx: int, truncate: bool) -> list[tuple[int, ...]]:
        """Token ids of every input, each checked against the limits (CPU work: off the event loop);
        `truncate` (Ollama's default) cuts an input longer than the context to it instead of refusing it."""
        limits = self._limits
        if len(items) > limits.max_embedding_inputs:
            raise InvalidInput(f"input: {len(items)} inputs, more than the {limits.max_embedding_inputs} "
                               "this gateway accepts in one request")
        longest = min(limits.max_embedding_tokens, EMBED_CONTEXT_TOKENS, n_ctx)
        result = []
        for index, item in enumerate(items):
            if isinstance(item, str):
                if len(item) > limits.max_prompt_chars:
                    raise InvalidInput(f"input[{index}] is longer than {limits.max_prompt_chars} characters")
                tokens = self._tokenizer.encode_embedding(item)
            else:
                tokens = item
                bad = [t for t in tokens if not 0 <= t < self._tokenizer.n_vocab]
                if bad:
                    raise InvalidInput(f"input[{index}]: token id {bad[0]} is outside the vocabulary of "
                                       f"{self._tokenizer.n_vocab}")
            if not tokens:
                raise InvalidInput(f"input[{index}] is empty")
            if truncate and len(tokens) > longest:
                tokens = tokens[:longest]
            if len(tokens) > longest:
                which = (f"the context the model is served with ({n_ctx} tokens)" if longest == n_ctx else
                         f"the {longest} tokens an input may have (max_embedding_tokens)")
                raise InvalidInput(f"input[{index}] is {len(tokens)} tokens, longer than {which}")
            result.append(tuple(tokens))
        return result

    async def vectors(self, body: EmbeddingRequest, truncate: bool = False) -> tuple[np.ndarray, int]:
        """The normalized vectors of the request's inputs (one row each) and their token count."""
        check_model(body.model, self._model_name, self._aliases)
        if body.dimensions is not None and body.dimensions != self.n_embd:
            raise InvalidInput(f"dimensions: this model's embeddings have {self.n_embd} dimensions; EdgeMesh "
                               "does not shorten them (leave dimensions out, or send it equal)")
        n_ctx = await self._scheduler.serving_context_length()
        if n_ctx is None:
            raise Unavailable(NO_EMBEDDER)
        tokens = await asyncio.to_thread(self._tokens, body.items(), n_ctx, truncate)
        batches = [tuple(tokens[i:i + EMBED_BATCH_INPUTS]) for i in range(0, len(tokens), EMBED_BATCH_INPUTS)]
        # At most one batch in flight per replica from this request, so a long list neither fills
        # every queue at once nor waits behind itself.
        lanes = asyncio.Semaphore(max(1, sum(p.kind == "replica" for p in self._scheduler.placements())))
        request_id = uuid.uuid4().hex

        async def one(index: int, inputs: tuple[tuple[int, ...], ...]) -> np.ndarray:
            async with lanes:
                batch = EmbedBatch(request_id=RequestId(f"{request_id}-{index}"), inputs=inputs)
                return (await self._scheduler.embed(batch)).vectors

        rows = await asyncio.gather(*(one(i, b) for i, b in enumerate(batches)))
        vectors = np.concatenate(rows)
        if vectors.shape[1] != self.n_embd:
            raise EdgeMeshError(f"a replica answered vectors of {vectors.shape[1]} dimensions, not {self.n_embd}")
        return vectors, sum(len(t) for t in tokens)

    async def counted(self, body: EmbeddingRequest, key_name: str, truncate: bool = False,
                      ) -> tuple[np.ndarray, int] | Response:
        """`vectors`, with the request's metrics; an error answer (OpenAI's shape) on failure."""
        started = time.monotonic()
        self._metrics.in_flight.inc()
        try:
            vectors, n_tokens = await self.vectors(body, truncate)
        except EdgeMeshError as exc:
            return counted_error(self._metrics, exc)
        finally:
            self._metrics.in_flight.dec()
        self._metrics.requests.labels(MESH_ROUTE, "200").inc()
        self._metrics.prompt_tokens.labels(MESH_ROUTE).inc(n_tokens)
        self._metrics.duration.labels(MESH_ROUTE).observe(time.monotonic() - started)
        if key_name:
            self._metrics.tokens_by_key.labels(key_name, "prompt").inc(n_tokens)
        return vectors, n_tokens

    async def handle(self, body: EmbeddingRequest, key_name: str = "") -> Response:
        result = await self.counted(body, key_name)
        if isinstance(result, Response):
            return result
        vectors, n_tokens = result
        data = [{"object": "embedding", "index": i,
                 "embedding": encode(row, body.encoding_format)} for i, row in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": self._model_name,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    """OpenAI's encodings: a list of floats, or base64 of the little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return [float(v) for v in row]
