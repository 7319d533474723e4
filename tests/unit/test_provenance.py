"""Provenance read from real (tiny) GGUF files, bounded whatever the file claims; and the
--allow-model setting: parsed from flags and EDGEMESH_ALLOWED_MODELS, checked to be sha256s."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mesh.allowed_models import AllowedModels, parse_allowed
from mesh.config import GatewayConfig, NodeConfig, add_arguments, from_arguments
from mesh.errors import ConfigError, ModelNotAllowed
from mesh.provenance import MAX_BASE_MODELS, MAX_TEXT, provenance_from_json
from node import gguf
from tests.fixtures.tiny_gguf import PROVENANCE, SPECS, write_tiny_gguf

LLAMA_Q8 = next(s for s in SPECS if s.name == "llama-q8_0")
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


def test_provenance_is_the_files_general_metadata_and_its_sha256(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "p.gguf", LLAMA_Q8, metadata=PROVENANCE, name="Tiny Provenance")
    sha = gguf.file_sha256(path)
    p = gguf.provenance(path, sha)
    assert (p.name, p.organization, p.basename, p.size_label, p.license, p.quantized_by) == (
        "Tiny Provenance", "EdgeMesh Tests", "tiny", "60K", "apache-2.0", "tiny_gguf.py")
    assert p.source == "https://example.invalid/tiny"
    assert p.file_type == "Q8_0"  # general.file_type 7, by name
    assert [(b.name, b.organization, b.repo_url) for b in p.base_models] == [
        ("Tiny Base", "Base Org", "https://example.invalid/base"), ("Tiny Other Base", "", "")]
    assert p.sha256 == sha
    shown = p.as_json()
    assert set(shown) >= {"name", "organization", "license", "base_models", "source", "sha256", "file_type"}
    assert provenance_from_json(shown) == p  # what `edgemesh status` rebuilds from /api/cluster
    assert "Tiny Provenance; by EdgeMesh Tests; licence apache-2.0; Q8_0" in p.summary()


def test_a_file_without_provenance_has_empty_fields_not_errors(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "plain.gguf", LLAMA_Q8)
    p = gguf.provenance(path, SHA_A)
    assert p.name == "tiny-llama-q8_0"
    assert (p.organization, p.license, p.source, p.base_models, p.file_type) == ("", "", "", (), "")
    assert "licence not stated" in p.summary()


def test_hostile_metadata_is_cut_short_and_has_no_control_characters(tmp_path: Path) -> None:
    hostile = {
        "general.organization": "<img src=x onerror=alert(1)>\n\x1b[2Jforged line" + "x" * 100_000,
        "general.license": "l" * 5000,
        "general.base_model.count": 1_000_000,  # more base models than the file names
        "general.file_type": 4242,  # no such llama.cpp file type
    }
    path = write_tiny_gguf(tmp_path / "hostile.gguf", LLAMA_Q8, metadata=hostile)
    p = gguf.provenance(path, SHA_A)
    assert len(p.organization) == MAX_TEXT and p.organization.endswith("…")
    assert "\n" not in p.organization and "\x1b" not in p.organization
    assert p.organization.startswith("<img src=x onerror=alert(1)>")  # kept as text: the page escapes it
    assert len(p.license) == MAX_TEXT
    assert len(p.base_models) == MAX_BASE_MODELS
    assert p.file_type == "4242"
    assert "\n" not in p.summary()


def test_allow_model_entries_are_sha256s_in_lower_case() -> None:
    assert parse_allowed([SHA_A.upper(), f" {SHA_B} ", SHA_A]) == (SHA_A, SHA_B)
    with pytest.raises(ConfigError, match="'not-a-sha' is not a sha256"):
        parse_allowed([SHA_A, "not-a-sha"])
    with pytest.raises(ConfigError, match="is not a sha256"):
        NodeConfig(allowed_models=("ab" * 31,))  # 62 digits
    assert NodeConfig(allowed_models=(SHA_B.upper(),)).allowed_models == (SHA_B,)


def test_an_allow_list_refuses_others_with_a_message_naming_the_model() -> None:
    allowed = AllowedModels((SHA_A,))
    allowed.check(SHA_A.upper(), "LoadModel")
    with pytest.raises(ModelNotAllowed, match=f"LoadModel: model {SHA_B} is not in --allow-model"):
        allowed.check(SHA_B, "LoadModel")
    assert ModelNotAllowed.grpc_code == "PERMISSION_DENIED"
    assert AllowedModels().permits(SHA_B)
    assert AllowedModels().describe() == "any (no --allow-model)"


@pytest.mark.parametrize("cls", [NodeConfig, GatewayConfig])
def test_allow_model_comes_from_repeated_flags_or_the_environment(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*argv: str) -> tuple[str, ...]:
        parser = argparse.ArgumentParser()
        add_arguments(parser, cls)
        allowed: tuple[str, ...] = from_arguments(cls, parser.parse_args(argv)).allowed_models
        return allowed

    assert parse() == ()
    assert parse("--allow-model", SHA_A, "--allow-model", SHA_B.upper()) == (SHA_A, SHA_B)
    monkeypatch.setenv("EDGEMESH_ALLOWED_MODELS", f"{SHA_A.upper()}, {SHA_B}")
    assert parse() == (SHA_A, SHA_B)
    assert parse("--allow-model", SHA_B) == (SHA_B,)  # a flag wins over the environment
    monkeypatch.setenv("EDGEMESH_ALLOWED_MODELS", f"{SHA_A},nope")
    with pytest.raises(ConfigError, match="'nope' is not a sha256"):
        parse()
