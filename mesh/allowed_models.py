"""The approved models of a node or a gateway (--allow-model SHA256, repeatable).

Without the flag every model is allowed. With it, a node loads, serves and ships only the
models on the list, and a gateway routes only to nodes that hold nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.errors import ConfigError, ModelNotAllowed

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_allowed(values: Iterable[str], flag: str = "--allow-model (or EDGEMESH_ALLOWED_MODELS)") -> tuple[str, ...]:
    """The entries of --allow-model, lower case and each checked to be a sha256 (64 hex digits)."""
    parsed: list[str] = []
    for value in values:
        sha = value.strip().lower()
        if not _SHA256.match(sha):
            raise ConfigError(f"{flag} entry {value[:80]!r} is not a sha256 (64 hex digits; `edgemesh model list` "
                              "shows each model's)")
        if sha not in parsed:
            parsed.append(sha)
    return tuple(parsed)


@dataclass(frozen=True)
class AllowedModels:
    """An allow-list of model sha256s; empty means every model is allowed."""

    shas: tuple[str, ...] = ()

    @property
    def restricted(self) -> bool:
        return bool(self.shas)

    def permits(self, sha256: str) -> bool:
        return not self.shas or sha256.lower() in self.shas

    def check(self, sha256: str, what: str) -> None:
        """Raise ModelNotAllowed naming the model when it is not on the list."""
        if not self.permits(sha256):
            raise ModelNotAllowed(f"{what}: model {sha256[:64]} is not in --allow-model "
                                  f"(allowed: {self.describe()})")

    def describe(self) -> str:
        """'any (no --allow-model)' or the list, for logs and status lines."""
        return ", ".join(self.shas) if self.shas else "any (no --allow-model)"
