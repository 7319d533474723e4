"""`edgemesh bench --concurrency 1,2,4,8`: many users at once, against llama.cpp's batched decode.

For each concurrency c, both sides generate `tokens` greedy tokens for c different prompts:
- llama.cpp: one context with c sequences, one `llama_decode` per step holding one row per
  sequence (what its `batched` example and its server do), in this process;
- the mesh: c streaming requests sent together through the gateway of a real `edgemesh up`.

It prints the aggregate tokens/s of each, their ratio, the mesh's ratio to its own single
stream, its inter-token gaps (p50, p95) and its time to first token. Sides alternate run by
run, so drift on a noisy machine hits both alike.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mesh.errors import ConfigError
from mesh.llama_runtime import model_params

PROMPT_OF = "Count on from {start}: {start}, {next},"  # a distinct prompt per stream, each easy to continue
MAX_STREAMS = 64


def stream_counts(text: str) -> list[int]:
    """`--concurrency 1,2,4,8` as numbers (ConfigError for anything else)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 or v > MAX_STREAMS for v in values):
        raise ConfigError(f"--concurrency takes stream counts from 1 to {MAX_STREAMS}, e.g. 1,2,4,8; got {text!r}")
    return values


def prompts(n: int) -> list[str]:
    return [PROMPT_OF.format(start=10 * i + 1, next=10 * i + 2) for i in range(n)]


@dataclass(frozen=True)
class Burst:
    """c streams run together."""

    tokens: int  # generated, all streams
    seconds: float  # first request sent -> last token
    first_token_s: list[float]  # per stream
    gaps_s: list[float]  # between consecutive tokens of a stream, all streams

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


class BatchedLlama:
    """llama.cpp's own batched greedy decode of several sequences in one context."""

    def __init__(self, model_path: Path, n_seqs: int, n_ctx_per_seq: int, threads: int) -> None:
        import llama_cpp as lc
        from llama_cpp._logger import set_verbose

        self._lc = lc
        set_verbose(False)  # llama.cpp's own start-up log is not part of the table
        lc.llama_backend_init()
        self._model = lc.llama_model_load_from_file(str(model_path).encode(), model_params())
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        params = lc.llama_context_default_params()
        params.n_ctx = n_seqs * n_ctx_per_seq
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = n_seqs
        params.n_threads = params.n_threads_batch = threads
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._batch = lc.llama_batch_init(512, 0, n_seqs)
        self.n_seqs = n_seqs

    def close(self) -> None:
        lc = self._lc
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        out = (self._lc.llama_token * (len(raw) + 8))()
        n = self._lc.llama_tokenize(self._vocab, raw, len(raw), out, len(out), True, False)
        return list(out[:n])

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants logits)."""
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        if self._lc.llama_decode(self._ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, row: int) -> int:
        logits = self._lc.llama_get_logits_ith(self._ctx, row)
        values = np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,))
        return int(values.argmax())

    def run(self, texts: list[str], tokens: int) -> Burst:
        lc = self._lc
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        started = time.perf_counter()
        last: list[int] = []
        positions: list[int] = []
        firsts: list[float] = []
        for seq, text in enumerate(texts):  # each prompt in one decode, its last row's logits kept
            ids = self.tokenize(text)
            self._decode([(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)])
            last.append(self._argmax(len(ids) - 1))
            positions.append(len(ids))
            firsts.append(time.perf_counter() - started)
        stamps = [[f] for f in firsts]
        for _ in range(tokens - 1):
            self._decode([(last[s], positions[s], s, True) for s in range(len(texts))])
            now = time.perf_counter() - started
            for s in range(len(texts)):
                last[s] = self._argmax(s)
                positions[s] += 1
                stamps[s].append(now)
        seconds = time.perf_counter() - started
        gaps = [b - a for times in stamps for a, b in itertools.pairwise(times)]
        return Burst(tokens * len(texts), seconds, firsts, gaps)


async def mesh_stream(client: httpx.AsyncClient, url: str, prompt: str, tokens: int,
                      started: float, times: list[float] | None = None) -> tuple[int, list[float]]:
    """One greedy stream; (tokens, arrival time of each, from `started`). `times`, when given,
    is filled as the tokens arrive, so a caller can watch a stream in flight."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    times = [] if times is None else times
    count = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = int(chunk["usage"]["completion_tokens"])
            elif chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter() - started)
    return count, times


async def mesh_burst(client: httpx.AsyncClient, url: str, texts: list[str], tokens: int) -> Burst:
    started = time.perf_counter()
    streams = await asyncio.gather(*(mesh_stream(client, url, t, tokens, started) for t in texts))
    seconds = time.perf_counter() - started
    gaps = [b - a for _, times in streams for a, b in itertools.pairwise(times)]
    return Burst(sum(n for n, _ in streams), seconds, [times[0] for _, times in streams if times], gaps)


@dataclass(frozen=True)
class PrefillGap:
    """Running streams while a long prompt is prefilled beside them."""

    normal_gap_s: float  # their median gap between tokens before the long prompt came
    longest_gap_s: float  # their longest gap that overlaps the long prompt's prefill
    prefill_s: float  # the long prompt sent -> its first token

    @property
    def ratio(self) -> float:
        return self.longest_gap_s / self.normal_gap_s if self.normal_gap_s > 0 else 0.0


# Tokens each running stream has produced before the long prompt goes in: their normal pace.
STEADY_TOKENS = 12
# Tokens each running stream produces after the long prompt's first token before the run ends.
AFTER_TOKENS = 3


async def prefill_gap_run(client: httpx.AsyncClient, url: str, streams: int, long_text: str) -> PrefillGap:
    """`streams` greedy streams; once each runs steadily, a request with `long_text` as its
    prompt; the streams are ended (a client disconnect) a few tokens after its first token."""
    started = time.perf_counter()
    times: list[list[float]] = [[] for _ in range(streams)]
    running = [asyncio.create_task(mesh_stream(client, url, text, 4096, started, times[i]))
               for i, text in enumerate(prompts(streams))]
    try:
        while min(len(t) for t in times) < STEADY_TOKENS:
            for task in running:
                if task.done():
                    task.result()  # a stream that failed says why
                    raise RuntimeError("a running stream ended before the long prompt was sent")
            await asyncio.sleep(0.005)
        sent = time.perf_counter() - started
        _, long_times = await mesh_stream(client, url, long_text, 1, started)
        if not long_times:
            raise RuntimeError("the long prompt got no token")
        first = long_times[0]
        while any(len([x for x in t if x > first]) < AFTER_TOKENS for t in times):
            await asyncio.sleep(0.005)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    normal = [b - a for t in times for a, b in itertools.pairwise(t) if b <= sent]
    during = [b - a for t in times for a, b in itertools.pairwise(t) if b > sent and a < first]
    return PrefillGap(statistics.median(normal), max(during, default=0.0), first - sent)


async def run_prefill_gap(url: str, streams: int, long_text: str, n_tokens: int, runs: int) -> list[PrefillGap]:
    """The prefill-gap table: `runs` runs of `streams` streams beside a prompt of `n_tokens`."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        results = [await prefill_gap_run(client, url, streams, long_text) for _ in range(runs)]
    out = sys.stdout
    out.write(f"\n{streams} running stream(s) while a {n_tokens}-token prompt is prefilled beside them, "
              f"{runs} run(s)\n{'run':>4} {'normal gap':>11} {'longest gap':>12} {'ratio':>7} {'prefill':>9}\n")
    for i, r in enumerate(results, 1):
        out.write(f"{i:>4} {r.normal_gap_s * 1000:>9.1f}ms {r.longest_gap_s * 1000:>10.1f}ms {r.ratio:>6.2f}x "
                  f"{r.prefill_s * 1000:>7.0f}ms\n")
    ratios = [r.ratio for r in results]
    out.write(f"longest gap / normal gap: median {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]\n")
    return results


def table(rows: list[dict[str, Any]], label: str) -> None:
    out = sys.stdout
    out.write(f"\n{label}: aggregate decode, median of runs [min-max]\n")
    out.write(f"{'streams':>7} {'llama.cpp batched':>19} {'edgemesh':>17} {'ratio':>18} {'vs 1 stream':>11} "
              f"{'gap p50':>8} {'gap p95':>8} {'first token':>11}\n")
    single = rows[0]["mesh_tps"] if rows and rows[0]["streams"] == 1 else 0.0
    for r in rows:
        ratios = r["ratios"]
        out.write(f"{r['streams']:>7} {r['base_tps']:>13.1f} tok/s {r['mesh_tps']:>11.1f} tok/s "
                  f"{statistics.median(ratios):>6.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] "
                  f"{(r['mesh_tps'] / single if single else 0.0):>10.2f}x "
                  f"{r['gap_p50'] * 1000:>6.1f}ms {r['gap_p95'] * 1000:>6.1f}ms {r['ttft'] * 1000:>9.0f}ms\n")


async def run_concurrency(url: str, model_path: Path, levels: list[int], tokens: int, runs: int, threads: int,
                          label: str) -> list[dict[str, Any]]:
    """The table for `levels`, against llama.cpp batched with `threads` threads."""
    loop = asyncio.get_running_loop()
    # One thread for every llama.cpp call: each calling thread gets its own OpenMP team, and two
    # teams on two cores slow the baseline (see node.compute).
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp-batched")
    rows = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await mesh_burst(client, url, prompts(1), 4)  # warm-up
        for c in levels:
            texts = prompts(c)
            llama = await loop.run_in_executor(worker, BatchedLlama, model_path, c, 256 + tokens, threads)
            try:
                await loop.run_in_executor(worker, llama.run, texts, 4)  # warm-up
                base: list[Burst] = []
                ours: list[Burst] = []
                for _ in range(runs):
                    base.append(await loop.run_in_executor(worker, llama.run, texts, tokens))
                    ours.append(await mesh_burst(client, url, texts, tokens))
            finally:
                await loop.run_in_executor(worker, llama.close)
            base_tps = statistics.median(b.tokens_per_second for b in base)
            mesh_tps = statistics.median(b.tokens_per_second for b in ours)
            gaps = [g for b in ours for g in b.gaps_s]
            rows.append({"streams": c, "base_tps": base_tps, "mesh_tps": mesh_tps,
                         "ratios": [m.tokens_per_second / b.tokens_per_second for m, b in zip(ours, base, strict=True)
                                    if b.tokens_per_second],
                         "gap_p50": percentile(gaps, 50), "gap_p95": percentile(gaps, 95),
                         "ttft": statistics.median(t for b in ours for t in b.first_token_s)})
    worker.shutdown()
    table(rows, label)
    return rows
