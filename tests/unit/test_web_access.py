"""--model-alias and --cors-origin values: what is accepted, and what is a start error."""

from __future__ import annotations

import pytest

from mesh.errors import ConfigError
from mesh.gateway.web_access import parse_aliases, parse_origins


def test_aliases_name_the_served_model() -> None:
    assert parse_aliases(("gpt-4o-mini=default", "org/model:latest=smol", " x = smol "), "smol") == \
        {"gpt-4o-mini", "org/model:latest", "x"}
    for bad, says in (("gpt", "NAME=MODEL"), ("=default", "NAME=MODEL"), ("a b=default", "NAME=MODEL"),
                      ("gpt=other", "this gateway serves 'smol'"), ("smol=default", "already the model's own")):
        with pytest.raises(ConfigError, match=says):
            parse_aliases((bad,), "smol")


def test_origins_are_exactly_what_a_browser_sends() -> None:
    assert parse_origins(("http://localhost:3000", "HTTPS://Chat.Example", "*", "https://[::1]:8443",
                          "http://localhost:3000")) == ("http://localhost:3000", "https://chat.example", "*",
                                                        "https://[::1]:8443")
    for bad in ("localhost:3000", "http://localhost:3000/", "http://host/path", "ftp://host", ""):
        with pytest.raises(ConfigError, match="is not an origin"):
            parse_origins((bad,))
