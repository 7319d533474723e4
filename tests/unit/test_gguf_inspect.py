"""node.gguf.inspect reads headers with our own lean reader (node.gguf_header), not the gguf
package's GGUFReader, which takes seconds on a real vocabulary. The package stays the
reference: both must say the same of every tiny model and of the default model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader

from node.gguf import GgufSummary, inspect
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf


def _as_the_package_reads_it(path: Path) -> dict[str, Any]:
    reader = GGUFReader(str(path), "r")

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    general = {key: field.contents() for key, field in reader.fields.items()
               if key.startswith("general.") and len(field.types) == 1
               and isinstance(field.contents(), (str, int, float)) and not isinstance(field.contents(), bool)}
    return {
        "architecture": arch,
        "n_layers": value(f"{arch}.block_count"),
        "n_embd": value(f"{arch}.embedding_length"),
        "n_ctx_train": value(f"{arch}.context_length"),
        "n_vocab": len(reader.fields["tokenizer.ggml.tokens"].data),
        "general": general,
        "tensors": [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes), int(t.data_offset))
                    for t in reader.tensors],
    }


def _as_we_read_it(summary: GgufSummary) -> dict[str, Any]:
    return {
        "architecture": summary.architecture, "n_layers": summary.n_layers, "n_embd": summary.n_embd,
        "n_ctx_train": summary.n_ctx_train, "n_vocab": summary.n_vocab, "general": dict(summary.general),
        "tensors": [(t.name, t.ggml_type, t.shape, t.n_bytes, t.data_offset) for t in summary.tensors],
    }


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_inspect_agrees_with_the_gguf_package_on_tiny_models(tmp_path: Path, spec: Any) -> None:
    path = write_tiny_gguf(tmp_path / f"{spec.name}.gguf", spec, metadata={"general.organization": "tests",
                                                                            "general.file_type": 7})
    assert _as_we_read_it(inspect(path)) == _as_the_package_reads_it(path)


@pytest.mark.slow
def test_inspect_agrees_with_the_gguf_package_on_the_default_model(default_model: Path) -> None:
    ours = _as_we_read_it(inspect(default_model))
    assert ours == _as_the_package_reads_it(default_model)
    assert ours["n_vocab"] > 40_000 and len(ours["tensors"]) > 100  # a real file, not a trivial one
