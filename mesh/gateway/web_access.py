"""Who may reach the API under which names: model aliases (--model-alias) and the browser
origins allowed to call it (--cors-origin). Both are checked at start, so a typo is a
one-line start error rather than a client that silently gets 404s or CORS failures."""

from __future__ import annotations

import re

from mesh.errors import ConfigError

_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?", re.IGNORECASE)


def parse_aliases(entries: tuple[str, ...], served: str) -> frozenset[str]:
    """The alias names of `--model-alias NAME=MODEL` flags; MODEL must be the served model's
    name or `default` (a gateway serves one model: an alias of anything else would be a lie)."""
    names: set[str] = set()
    for entry in entries:
        name, sep, target = entry.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not _ALIAS.fullmatch(name):
            raise ConfigError(f"--model-alias {entry!r} is not NAME=MODEL (NAME: letters, digits and ._:/@+-)")
        if target not in (served, "default"):
            raise ConfigError(f"--model-alias {entry!r}: this gateway serves {served!r} (or say 'default'), "
                              f"not {target!r}")
        if name in (served, "default"):
            raise ConfigError(f"--model-alias {entry!r}: {name!r} is already the model's own name")
        names.add(name)
    return frozenset(names)


def parse_origins(entries: tuple[str, ...]) -> tuple[str, ...]:
    """The --cors-origin values, each `*` or scheme://host[:port] exactly as a browser sends it
    in its Origin header (no path, no trailing slash: those never match)."""
    origins: list[str] = []
    for entry in entries:
        origin = entry.strip()
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"--cors-origin {entry!r} is not an origin: give scheme://host[:port] (no path or "
                              "trailing slash), e.g. http://localhost:3000, or *")
        origins.append(origin.lower() if origin != "*" else origin)
    return tuple(dict.fromkeys(origins))
