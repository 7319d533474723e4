"""The llama.cpp RPC reference gives each of N devices ~1/N of the layers (benchmarks/llama_rpc.py)."""

from __future__ import annotations

from benchmarks.llama_rpc import layer_split


def test_every_layer_on_rpc_servers_output_head_with_the_last() -> None:
    # SmolLM2-135M: 30 layers + the output head (llama.cpp's 31st offloadable unit).
    split = layer_split(30, 3, head_holds_layers=False)
    assert (split.head_layers, split.n_gpu_layers, split.tensor_split) == (0, 31, (10, 10, 11))


def test_head_cpu_as_first_device_keeps_the_first_layers() -> None:
    three = layer_split(30, 3, head_holds_layers=True)
    assert (three.head_layers, three.n_gpu_layers, three.tensor_split) == (10, 21, (10, 11))
    two = layer_split(30, 2, head_holds_layers=True)
    assert (two.head_layers, two.n_gpu_layers, two.tensor_split) == (15, 16, (16,))
    uneven = layer_split(7, 3, head_holds_layers=True)
    assert (uneven.head_layers, sum(uneven.tensor_split)) == (2, 7 - 2 + 1)
