"""`edgemesh bench --concurrency` refuses stream counts it cannot run, at once and by name,
before minutes of set-up (the mesh start, the model load)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mesh.bench_concurrency import MAX_STREAMS, stream_counts
from mesh.errors import ConfigError
from tests.conftest import REPO


def test_stream_counts_are_positive_integers_up_to_the_bound() -> None:
    assert stream_counts("1,2,4,8") == [1, 2, 4, 8]
    assert stream_counts(str(MAX_STREAMS)) == [MAX_STREAMS]
    for bad in ("", "x", "1,,2", "0,4", "-1", "2.5", str(MAX_STREAMS + 1), "1;2"):
        with pytest.raises(ConfigError, match="--concurrency takes stream counts from 1 to"):
            stream_counts(bad)


def test_the_cli_refuses_garbage_before_any_set_up() -> None:
    done = subprocess.run([sys.executable, "-m", "mesh.cli", "bench", "--concurrency", "8,lots"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "--concurrency takes stream counts from 1 to" in done.stderr and "'8,lots'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["--prefill-beside", "4"], ["--concurrency", "8", "--prefill-beside", "-1"],
                                  ["--concurrency", "8", "--prefill-beside", "65"]])
def test_prefill_beside_needs_running_streams_and_a_count_in_bounds(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "mesh.cli", "bench", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "--prefill-beside takes 0 to 64 running streams, with --concurrency" in done.stderr
    assert "Traceback" not in done.stderr
