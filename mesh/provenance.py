"""Where a model comes from, as its GGUF file says (general.* metadata) and its sha256.

The metadata is written by whoever made the file: every value here is untrusted text,
cut to a bounded length and count before it is shown anywhere (the web page inserts it
as text, never as HTML). The sha256 is the one fact we computed ourselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_TEXT = 200  # characters of any one value shown
MAX_BASE_MODELS = 8  # base models listed (a merge may name many)
_BASE_FIELDS = ("name", "organization", "version", "repo_url", "url")
_TEXT_FIELDS = ("name", "organization", "basename", "finetune", "size_label", "license", "source", "quantized_by",
                "file_type")

MetaValue = str | int | float


def clip(value: object, limit: int = MAX_TEXT) -> str:
    """A metadata value as bounded, printable text ('' for none)."""
    if value is None or isinstance(value, bool):
        return ""
    text = str(value)
    # Control characters (newlines, escape sequences) would let a file forge lines in a
    # terminal or a log; they are shown as spaces.
    text = "".join(c if c.isprintable() else " " for c in text[:limit * 2])
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True)
class BaseModel:
    name: str
    organization: str
    version: str
    repo_url: str
    url: str

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "organization": self.organization, "version": self.version,
                "repo_url": self.repo_url, "url": self.url}


@dataclass(frozen=True)
class Provenance:
    """What a GGUF file claims about its origin, and its sha256."""

    sha256: str
    name: str = ""
    organization: str = ""
    basename: str = ""
    finetune: str = ""
    size_label: str = ""
    license: str = ""
    base_models: tuple[BaseModel, ...] = ()
    source: str = ""  # source.url, else source.repo_url, else source.huggingface.repository
    quantized_by: str = ""
    file_type: str = ""  # e.g. "Q4_K_M" (the number when it has no known name)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "organization": self.organization, "basename": self.basename,
                "finetune": self.finetune, "size_label": self.size_label, "license": self.license,
                "base_models": [b.as_json() for b in self.base_models], "source": self.source,
                "quantized_by": self.quantized_by, "file_type": self.file_type, "sha256": self.sha256}

    def summary(self) -> str:
        """One line for people: name, organization, licence, file type and a short sha256."""
        parts = [self.name or "(no general.name)"]
        if self.organization:
            parts.append(f"by {self.organization}")
        parts.append(f"licence {self.license or 'not stated'}")
        if self.file_type:
            parts.append(self.file_type)
        if self.base_models:
            parts.append("base " + ", ".join(b.name or b.repo_url or "?" for b in self.base_models))
        if self.source:
            parts.append(f"source {self.source}")
        if self.quantized_by:
            parts.append(f"quantized by {self.quantized_by}")
        parts.append(f"sha256 {self.sha256[:12]}")
        return "; ".join(parts)


def file_type_name(value: MetaValue | None) -> str:
    """general.file_type (llama.cpp's LLAMA_FTYPE number) as its name, e.g. 15 -> Q4_K_M."""
    if value is None or value == "":
        return ""
    if not isinstance(value, int):
        return clip(value, 32)
    from gguf import LlamaFileType  # the gguf package's table of llama.cpp's file types

    try:
        name = LlamaFileType(value).name
    except ValueError:
        return str(value)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def from_metadata(meta: Mapping[str, MetaValue], sha256: str) -> Provenance:
    """Provenance from a file's general.* metadata (keys as GGUF names them)."""

    def text(key: str) -> str:
        return clip(meta.get(f"general.{key}"))

    count = meta.get("general.base_model.count", 0)
    n_base = min(count, MAX_BASE_MODELS) if isinstance(count, int) and count > 0 else 0
    bases = tuple(BaseModel(**{f: text(f"base_model.{i}.{f}") for f in _BASE_FIELDS}) for i in range(n_base))
    source = text("source.url") or text("source.repo_url") or text("source.huggingface.repository")
    return Provenance(
        sha256=sha256, name=text("name"), organization=text("organization"), basename=text("basename"),
        finetune=text("finetune"), size_label=text("size_label"),
        license=text("license") or text("license.name"), base_models=bases, source=source,
        quantized_by=text("quantized_by"), file_type=file_type_name(meta.get("general.file_type")))


def provenance_from_json(data: Mapping[str, Any]) -> Provenance:
    """A Provenance back from its as_json() form (a gateway's answer), every value bounded again."""
    bases = data.get("base_models")
    return Provenance(
        sha256=clip(data.get("sha256"), 64), **{f: clip(data.get(f)) for f in _TEXT_FIELDS},
        base_models=tuple(BaseModel(**{f: clip(b.get(f)) for f in _BASE_FIELDS})
                          for b in (bases if isinstance(bases, list) else [])[:MAX_BASE_MODELS]
                          if isinstance(b, dict)))
