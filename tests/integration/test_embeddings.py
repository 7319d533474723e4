"""/v1/embeddings through the official `openai` client (issue 19, part 6): vectors of the
model's width, equal to llama.cpp's own embeddings of the same text, batch lists and
base64, bad input refused by name, and a mesh of pipeline stages only saying no node can embed."""

from __future__ import annotations

import base64
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import TEST_THREADS, Launcher, Proc, gateway_url, metric_lines, wait_for_nodes

pytestmark = pytest.mark.slow

TEXTS = ["The sky is blue today.", "Cats chase mice in the old barn."]


# A short Embed deadline, so that the failover check below waits seconds, not minutes; not
# shorter, because the suite runs on parallel workers sharing two cores and a healthy replica
# must answer within it (3 s was missed at a load average of 20).
EMBED_DEADLINE_S = "10"


@pytest.fixture(scope="module")
def replicas(module_launcher: Launcher, default_model: Path) -> list[Proc]:
    return [module_launcher.node(name, default_model, "--role", "replica") for name in ("replica-a", "replica-b")]


@pytest.fixture(scope="module")
def mesh_url(module_launcher: Launcher, default_model: Path, replicas: list[Proc]) -> Iterator[str]:
    gateway = module_launcher.start("gw", ["gateway", "--model", str(default_model), "--port", "0"],
                                    env={"EDGEMESH_EMBED_RPC_S": EMBED_DEADLINE_S})
    url = gateway_url(gateway)
    wait_for_nodes(url, len(replicas))
    yield url


@pytest.fixture(scope="module")
def client(mesh_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh_url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(default_model: Path) -> list[np.ndarray]:
    """llama.cpp's own embeddings of TEXTS: mean pooling (the model declares none), L2-normalized."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(default_model), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_threads=TEST_THREADS,
                          n_threads_batch=TEST_THREADS, verbose=False)
    return [np.asarray(v, dtype=np.float32) for v in llm.embed(TEXTS, normalize=True)]


def test_vectors_have_the_width_and_equal_llama_cpp(client: openai.OpenAI, mesh_url: str, default_model: Path,
                                                    reference: list[np.ndarray]) -> None:
    from node.gguf import inspect

    width = inspect(default_model).n_embd
    answer = client.embeddings.create(model="default", input=TEXTS, user="alice")
    assert [d.index for d in answer.data] == [0, 1]
    vectors = [np.asarray(d.embedding, dtype=np.float32) for d in answer.data]
    assert all(v.shape == (width,) for v in vectors)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    for got, expected in zip(vectors, reference, strict=True):
        assert np.max(np.abs(got - expected)) < 1e-4
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0

    # One string; base64 asked for by name (the client hands the string back as it came; without
    # encoding_format it asks for base64 itself and decodes it, so the calls above took that path).
    single = client.embeddings.create(model="default", input=TEXTS[0])
    assert np.max(np.abs(np.asarray(single.data[0].embedding) - reference[0])) < 1e-4
    packed = client.embeddings.create(model="default", input=TEXTS, encoding_format="base64", dimensions=width)
    for got, expected in zip(packed.data, reference, strict=True):
        assert isinstance(got.embedding, str)
        decoded = np.frombuffer(base64.b64decode(got.embedding), dtype="<f4")
        assert np.max(np.abs(decoded - expected)) < 1e-4
    plain = httpx.post(f"{mesh_url}/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "float"},
                       timeout=60).json()
    assert plain["object"] == "list" and plain["model"] and plain["data"][0]["object"] == "embedding"
    assert np.max(np.abs(np.asarray(plain["data"][0]["embedding"]) - reference[1])) < 1e-4

    # A batch longer than one Embed call (16 inputs): every row in its place.
    many = client.embeddings.create(model="default", input=[TEXTS[i % 2] for i in range(21)])
    assert [d.index for d in many.data] == list(range(21))
    for d in many.data:
        assert np.max(np.abs(np.asarray(d.embedding) - reference[d.index % 2])) < 1e-4


def test_token_ids_and_bad_input(client: openai.OpenAI, mesh_url: str, default_model: Path,
                                 reference: list[np.ndarray]) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(default_model), vocab_only=True, verbose=False)
    ids = [list(vocab.tokenize(text.encode())) for text in TEXTS]
    by_ids = client.embeddings.create(model="default", input=ids)
    for got, expected in zip(by_ids.data, reference, strict=True):
        assert np.max(np.abs(np.asarray(got.embedding) - expected)) < 1e-4
    one = client.embeddings.create(model="default", input=ids[1])
    assert np.max(np.abs(np.asarray(one.data[0].embedding) - reference[1])) < 1e-4

    refusals = [
        ({"input": []}, "input is empty"),
        ({"input": ""}, "input is empty"),
        ({"input": "x", "dimensions": 8}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [[1, 2], [10**9]]}, "outside the vocabulary"),
        ({"input": "word " * 600}, "input[0] is 601 tokens, longer than the 512 tokens an input may have"),
        ({"input": ["x"] * 2049}, "2049 inputs"),
        ({"input": "x", "truncate": True}, "truncate: unknown field"),
    ]
    for body, message in refusals:
        reply = httpx.post(f"{mesh_url}/v1/embeddings", json=body, timeout=60)
        assert reply.status_code == 400, (body, reply.text)
        assert message in reply.json()["error"]["message"], (message, reply.text)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-5", input="x")
    # And it went on serving.
    again = client.embeddings.create(model="default", input=TEXTS[0])
    assert np.max(np.abs(np.asarray(again.data[0].embedding) - reference[0])) < 1e-4


def test_a_replica_that_fails_before_answering_is_replaced(client: openai.OpenAI, mesh_url: str,
                                                          replicas: list[Proc], reference: list[np.ndarray]) -> None:
    # Two idle replicas tie, and a tie goes to the lower node id: freeze that one (it keeps its
    # connections and answers nothing), so the batch goes to it first, misses its deadline and
    # is asked of the other replica.
    first = min(replicas, key=lambda p: p.ready[3])

    def node_errors() -> float:
        text = httpx.get(f"{mesh_url}/metrics", timeout=30).text
        return metric_lines(text, "edgemesh_retries_total").get('edgemesh_retries_total{reason="node_error"}', 0.0)

    before = node_errors()
    os.kill(first.pid, signal.SIGSTOP)
    try:
        answer = client.embeddings.create(model="default", input=TEXTS[0])
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert np.max(np.abs(np.asarray(answer.data[0].embedding) - reference[0])) < 1e-4
    assert node_errors() == before + 1


def test_a_mesh_of_stages_only_says_no_node_can_embed(launcher: Launcher, default_model: Path) -> None:
    launcher.node("stage", default_model, "--role", "stage")
    url = gateway_url(launcher.gateway("gw-stages", default_model))
    wait_for_nodes(url, 1)
    reply = httpx.post(f"{url}/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert reply.status_code == 503, reply.text
    assert "no node can compute embeddings" in reply.json()["error"]["message"]
