"""Gemma 3 (a real 270M GGUF of mixed K-quants) on the stage engine and through a mesh, against llama.cpp.

The prompts include one longer than the model's 512-token sliding window, so that the
sliding-window layers mask differently from the global ones and the prompt is prefilled in
two chunks. Parity is greedy output token for token, and the logits of every step within a
hair of llama.cpp's (they are bit-identical on this machine once weights sit where llama.cpp
puts them; the bound leaves room for another CPU's kernels, far below the error a wrong
graph or a plain-layout weight makes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from node.engines.stage.weights import read_header
from tests.conftest import TEST_THREADS, Launcher, gateway_url
from tests.fixtures.stage_chain import Pipeline

pytestmark = pytest.mark.slow

TOKENS = 64
N_CTX = 1024
LOGIT_TOL = 1e-4  # relative to the largest logit; a weight in the plain layout gives ~1e-2
PROMPTS = {
    "short": "The capital of France is",
    "recipe": "Here is a recipe for bread: first,",
    "beyond-window": "The history of the city is long and complicated. " * 75,  # ~750 tokens > 512
}
SPLITS = {1: [(0, 18)], 2: [(0, 9), (9, 18)], 3: [(0, 5), (5, 12), (12, 18)]}


@pytest.fixture(scope="module")
def reference(gemma3_model: Path) -> Iterator[Any]:
    import llama_cpp

    # built as a replica builds it: only the last row of each batch reaches the head
    llm = llama_cpp.Llama(model_path=str(gemma3_model), n_ctx=N_CTX, n_threads=TEST_THREADS,
                          n_threads_batch=TEST_THREADS, n_batch=512, verbose=False, seed=0)
    yield llm
    llm.close()


GREEDY: dict[str, tuple[list[int], list[int], np.ndarray]] = {}  # llama.cpp's run of each prompt, made once


def llama_greedy(llm: Any, prompt: str) -> tuple[list[int], list[int], np.ndarray]:
    """(prompt tokens, greedy continuation, the logits that chose each continuation token)."""
    if prompt not in GREEDY:
        GREEDY[prompt] = _llama_greedy(llm, prompt)
    return GREEDY[prompt]


def _llama_greedy(llm: Any, prompt: str) -> tuple[list[int], list[int], np.ndarray]:
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.reset()
    llm.eval(tokens)
    out: list[int] = []
    rows: list[np.ndarray] = []
    for _ in range(TOKENS):
        row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
        rows.append(row)
        out.append(int(np.argmax(row)))
        llm.eval([out[-1]])
    return tokens, out, np.stack(rows)


def test_the_model_has_sliding_window_and_global_layers(gemma3_model: Path, reference: Any) -> None:
    args, _ = read_header(gemma3_model)
    assert args.arch == "gemma3" and args.n_layer == 18 and args.n_swa == 512
    assert [il for il in range(18) if not args.is_swa(il)] == [5, 11, 17]
    assert len(reference.tokenize(PROMPTS["beyond-window"].encode())) > args.n_swa


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_greedy_output_through_stages_equals_llama_cpp(gemma3_model: Path, reference: Any, prompt: str,
                                                        n_stages: int) -> None:
    tokens, want, want_logits = llama_greedy(reference, PROMPTS[prompt])
    pipe = Pipeline(gemma3_model, SPLITS[n_stages], n_ctx=N_CTX, slots=1, threads=TEST_THREADS)
    try:
        logits = pipe.forward("s", 0, tokens)
        got: list[int] = []
        worst = 0.0
        for step in range(TOKENS):
            worst = max(worst, float(np.abs(logits - want_logits[step]).max() / np.abs(want_logits[step]).max()))
            got.append(int(np.argmax(logits)))
            if got[-1] != want[step]:
                break
            logits = pipe.forward("s", len(tokens) + step, [got[-1]])
    finally:
        pipe.close()
    assert got == want, f"{prompt}, {n_stages} stage(s): diverged at token {len(got) - 1}"
    assert worst <= LOGIT_TOL, f"{prompt}, {n_stages} stage(s): logits differ by {worst:.2e} of the largest"


def _completion(url: str, prompt: str) -> str:
    response = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": TOKENS, "temperature": 0},
                          timeout=300)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


@pytest.mark.parametrize("layout", ["pipeline", "replica"])
def test_up_serves_gemma3_by_catalogue_name_as_llama_cpp_does(launcher: Launcher, gemma3_model: Path,
                                                              reference: Any, layout: str) -> None:
    """What a user types: `edgemesh up --model gemma3-270m`. With a memory limit no node can
    hold the whole model, so the planner forms a 3-stage pipeline by itself; without one,
    the node serves it as a llama.cpp replica."""
    limit = ["--nodes", "3", "--memory-limit", "250MB"] if layout == "pipeline" else ["--nodes", "1"]
    # --threads 1: several test workers share the cores (ggml's threads spin while they wait)
    up = launcher.start("up", ["up", "--model", "gemma3-270m", "--port", "0", "--threads", "1", *limit])
    url = gateway_url(up)
    view = httpx.get(f"{url}/api/cluster", timeout=10).json()
    plan = view["placement"]["plan"]
    if layout == "pipeline":
        assert [p["kind"] for p in plan] == ["pipeline"], plan
        ranges = [tuple(s["layers"]) for s in plan[0]["stages"]]
        assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 18, ranges
    else:
        assert [p["kind"] for p in plan] == ["replica"], plan
    # The prompt beyond the sliding window goes through the same 3-stage shape in the next test
    # (and through 1-3 in-process stages above): one short prompt proves what `up` placed.
    for name in ("short",) if layout == "pipeline" else ("recipe",):
        reference.reset()  # a fresh run, as the mesh's: no prefix reused from the KV cache
        want = reference.create_completion(PROMPTS[name], max_tokens=TOKENS, temperature=0)["choices"][0]["text"]
        assert _completion(url, PROMPTS[name]) == want, name


def test_devices_started_one_by_one_form_a_gemma3_pipeline(launcher: Launcher, gemma3_model: Path,
                                                          reference: Any) -> None:
    """README's device commands, one device at a time, each naming the model by its catalogue
    name: three nodes whose memory limit holds no replica, then a gateway that finds them over
    mDNS and places a 3-stage pipeline on them by itself."""
    for i in (1, 2, 3):
        launcher.start(f"dev-{i}", ["node", "--host", "127.0.0.1", "--name", f"dev-{i}", "--model", "gemma3-270m",
                                    "--memory-limit", "250MB", "--port", "0", "--metrics-port", "0",
                                    "--step-port", "0", "--threads", "1"])
    gateway = launcher.start("gw", ["gateway", "--model", "gemma3-270m", "--port", "0"])
    url = gateway_url(gateway)
    deadline = time.monotonic() + 120
    while True:
        view = httpx.get(f"{url}/api/cluster", timeout=10).json()
        if view["placement"]["converged"] and view["placements"]:
            break
        assert time.monotonic() < deadline, f"no placement within 120 s: {view['placement']}"
        time.sleep(0.2)
    assert [len(p["stages"]) for p in view["placements"]] == [3], view["placements"]
    reference.reset()
    want = reference.create_completion(PROMPTS["beyond-window"], max_tokens=TOKENS, temperature=0)
    assert _completion(url, PROMPTS["beyond-window"]) == want["choices"][0]["text"]
