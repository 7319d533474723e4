"""`edgemesh bench`: streaming speed through a local mesh as a ratio to llama-cpp-python.

Both sides run in the same process run, interleaved (baseline, mesh, baseline, mesh, ...)
so that thermal and background drift hit both alike. The baseline is llama-cpp-python's
own streaming completion with the same model, threads, prompt and greedy sampling; the
mesh side is a real `edgemesh up` (node processes + gateway) measured over HTTP/SSE.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mesh.bench_concurrency import MAX_STREAMS, mesh_stream, run_concurrency, run_prefill_gap, stream_counts
from mesh.config import BenchConfig, UpConfig, check_thread_counts
from mesh.errors import ConfigError
from mesh.llama_runtime import install
from mesh.local_mesh import run_local_mesh
from mesh.model_store import resolve
from mesh.ready_file import read_gateway_ready
from mesh.template_check import check_model_templates

log = logging.getLogger(__name__)

# Counting keeps a small model going for hundreds of tokens under greedy decoding, so both
# sides generate the full --tokens and the runs compare like with like.
BENCH_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


@dataclass(frozen=True)
class RunTiming:
    tokens: int
    first_token_s: float  # request sent -> first token
    total_s: float  # request sent -> last token

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first token (prefill excluded)."""
        span = self.total_s - self.first_token_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0

    @property
    def end_to_end_tps(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


def long_prompt(llm: Any, n_tokens: int) -> str:
    """Counting text of about n_tokens tokens, for the prefill measurement."""
    words: list[str] = []
    i = 1
    while len(llm.tokenize(", ".join(words).encode(), add_bos=False)) < n_tokens - 2:
        words.append(str(i))
        i += 1
    return ", ".join(words)


def baseline_run(llm: Any, tokens: int, prompt: str = BENCH_PROMPT) -> RunTiming:
    """llama-cpp-python called directly, streaming, greedy."""
    llm.reset()
    start = time.perf_counter()
    first = 0.0
    count = 0
    for _chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=True):
        count += 1
        if count == 1:
            first = time.perf_counter() - start
    return RunTiming(count, first, time.perf_counter() - start)


async def mesh_run(client: httpx.AsyncClient, url: str, tokens: int, prompt: str = BENCH_PROMPT) -> RunTiming:
    start = time.perf_counter()
    count, times = await mesh_stream(client, url, prompt, tokens, start)
    return RunTiming(count, times[0] if times else 0.0, time.perf_counter() - start)


def _summary(name: str, runs: list[RunTiming]) -> tuple[float, float, float]:
    decode = statistics.median(r.decode_tps for r in runs)
    e2e = statistics.median(r.end_to_end_tps for r in runs)
    ttft = statistics.median(r.first_token_s for r in runs)
    sys.stdout.write(f"{name:24s} decode {decode:7.1f} tok/s   end-to-end {e2e:7.1f} tok/s   "
                     f"first token {ttft * 1000:7.1f} ms   tokens {runs[0].tokens}\n")
    return decode, e2e, ttft


async def _bench(options: BenchConfig, streams: list[int]) -> dict[str, float]:
    """`streams`: the --concurrency levels (none: the single-stream figures)."""
    import llama_cpp

    check_thread_counts(options.threads, options.decode_threads)  # before minutes of set-up
    threads = options.threads or os.cpu_count() or 1
    model_path = await asyncio.to_thread(resolve, options.model)
    # llama.cpp always runs on this one thread: libgomp gives every thread that computes its own
    # OpenMP team, and two teams on two cores slow the baseline (see node.compute).
    baseline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp")
    loop = asyncio.get_running_loop()

    async def baseline(tokens: int, prompt: str = BENCH_PROMPT) -> RunTiming:
        return await loop.run_in_executor(baseline_thread, baseline_run, llm, tokens, prompt)

    check_model_templates(model_path)  # Llama() compiles the file's chat templates (mesh.template_check)
    install()  # the baseline loads the model as a node does (mesh.llama_runtime)
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    stop = asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="edgemesh-bench-") as tmp:
        ready = Path(tmp) / "ready"
        mesh = asyncio.create_task(run_local_mesh(UpConfig(
            nodes=options.nodes, port=0, model=str(model_path), strategy=options.strategy,
            threads=options.threads if options.threads else (threads if options.nodes == 1 else 0),
            decode_threads=options.decode_threads, insecure_plaintext=options.insecure_plaintext,
            slots=options.slots, ready_file=str(ready), timeouts=options.timeouts, limits=options.limits), stop))
        try:
            while (written := read_gateway_ready(ready)) is None:
                if mesh.done():
                    mesh.result()
                    raise RuntimeError("the local mesh stopped before it was ready")
                await asyncio.sleep(0.1)
            url = written.url
            if streams:
                slots = options.slots or "auto"
                label = (f"{model_path.name}, edgemesh {options.strategy} x{options.nodes} with {slots} "
                         f"slot(s) per node, {threads} thread(s), {options.tokens} tokens per stream, "
                         f"{options.runs} run(s)")
                rows = await run_concurrency(url, model_path, streams, options.tokens,
                                             options.runs, threads, label)
                figures = {f"ratio_at_{r['streams']}": statistics.median(r["ratios"]) for r in rows}
                if options.prefill_beside:
                    gaps = await run_prefill_gap(url, options.prefill_beside,
                                                 long_prompt(llm, options.prefill_tokens),
                                                 options.prefill_tokens, options.runs)
                    figures["prefill_gap_ratio"] = statistics.median(g.ratio for g in gaps)
                return figures
            base: list[RunTiming] = []
            ours: list[RunTiming] = []
            prefill_prompt = long_prompt(llm, options.prefill_tokens)
            base_prefill: list[float] = []
            ours_prefill: list[float] = []
            async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
                await mesh_run(client, url, 8)  # warm-up: first request pays for lazy set-up
                await baseline(8)
                for i in range(options.runs):
                    base.append(await baseline(options.tokens))
                    ours.append(await mesh_run(client, url, options.tokens))
                    log.info("run %d/%d: llama.cpp %.1f tok/s, mesh %.1f tok/s", i + 1, options.runs,
                             base[-1].decode_tps, ours[-1].decode_tps)
                    # Prefill: time to the first token of a long prompt (prompt evaluation).
                    base_prefill.append((await baseline(1, prefill_prompt)).first_token_s)
                    ours_prefill.append((await mesh_run(client, url, 1, prefill_prompt)).total_s)
        finally:
            stop.set()
            await asyncio.gather(mesh, return_exceptions=True)
            baseline_thread.shutdown()
    if min(r.tokens for r in base + ours) < options.tokens:
        log.warning("some runs ended before %d tokens (end of generation); rates are still comparable",
                    options.tokens)
    sys.stdout.write(f"\nmodel {model_path.name}, {threads} thread(s), {options.tokens} tokens, "
                     f"{options.runs} run(s), median of runs\n")
    b_dec, b_e2e, b_ttft = _summary("llama-cpp-python direct", base)
    m_dec, m_e2e, m_ttft = _summary(f"edgemesh {options.strategy} x{options.nodes}", ours)
    n_prefill = len(llm.tokenize(prefill_prompt.encode(), add_bos=True))
    b_pre = n_prefill / statistics.median(base_prefill)
    m_pre = n_prefill / statistics.median(ours_prefill)
    sys.stdout.write(f"prefill of {n_prefill} tokens: llama-cpp-python {b_pre:7.1f} tok/s, "
                     f"edgemesh {m_pre:7.1f} tok/s\n")
    result = {"decode_ratio": m_dec / b_dec if b_dec else 0.0, "end_to_end_ratio": m_e2e / b_e2e if b_e2e else 0.0,
              "prefill_ratio": m_pre / b_pre if b_pre else 0.0,
              "baseline_decode_tps": b_dec, "mesh_decode_tps": m_dec,
              "baseline_ttft_s": b_ttft, "mesh_ttft_s": m_ttft}
    sys.stdout.write(f"ratio mesh / llama.cpp: decode {result['decode_ratio']:.3f}x, "
                     f"end-to-end {result['end_to_end_ratio']:.3f}x, prefill {result['prefill_ratio']:.3f}x\n")
    return result


def run_bench(options: BenchConfig) -> dict[str, float]:
    streams = stream_counts(options.concurrency) if options.concurrency else []  # before minutes of set-up
    if (options.prefill_beside and not streams) or not 0 <= options.prefill_beside <= MAX_STREAMS:
        raise ConfigError(f"--prefill-beside takes 0 to {MAX_STREAMS} running streams, with --concurrency; "
                          f"got {options.prefill_beside}")
    return asyncio.run(_bench(options, streams))
