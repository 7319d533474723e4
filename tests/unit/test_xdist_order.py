"""The order pytest-xdist hands files to workers in: tiers first, the longest files first
within their tier, every file's tests together and in their own order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from tests.conftest import REPO
from tests.fixtures.xdist_order import LONGEST_FIRST, pytest_collection_modifyitems


@dataclass
class Item:
    nodeid: str


def sorted_ids(nodeids: list[str]) -> list[str]:
    items = [Item(n) for n in nodeids]
    pytest_collection_modifyitems(cast(Any, items))
    return [item.nodeid for item in items]


def test_tiers_lead_and_the_longest_files_lead_their_tier() -> None:
    collected = [
        "tests/unit/test_a.py::test_1",
        "tests/integration/test_a.py::test_1",
        "tests/integration/test_gemma3_parity.py::test_1",
        "tests/integration/test_gemma3_parity.py::test_2",
        "tests/system/test_a.py::test_1",
        "tests/system/test_netns_faults.py::test_1",
        "tests/system/test_pipeline_links.py::TestBadWifi::test_1",
        "tests/integration/test_a.py::test_2",
    ]
    assert sorted_ids(collected) == [
        "tests/system/test_pipeline_links.py::TestBadWifi::test_1",
        "tests/system/test_netns_faults.py::test_1",
        "tests/system/test_a.py::test_1",
        "tests/integration/test_gemma3_parity.py::test_1",
        "tests/integration/test_gemma3_parity.py::test_2",
        "tests/integration/test_a.py::test_1",
        "tests/integration/test_a.py::test_2",
        "tests/unit/test_a.py::test_1",
    ]


def test_every_file_named_longest_first_exists() -> None:
    # A renamed file would silently lose its place at the front.
    missing = [path for path in LONGEST_FIRST if not (REPO / path).is_file()]
    assert not missing, missing
