"""llama.cpp's RPC mode, the reference of the pipeline benchmark, runs distributed and cleans up.

Opt-in by its binaries: the normal suite never builds llama.cpp; once
`python -m benchmarks.llama_rpc --build` has cached them, this runs two real rpc-servers on
loopback with the default model's layers split between them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.llama_build import cached
from benchmarks.llama_rpc import Loopback, distributed
from tests.harness.processes import proc_table

pytestmark = pytest.mark.slow

BINARIES = cached()


@pytest.mark.skipif(BINARIES is None, reason="llama.cpp's rpc-server and llama-bench are not built: "
                                             "python -m benchmarks.llama_rpc --build")
def test_two_rpc_servers_on_loopback_decode_and_end(default_model: Path) -> None:
    assert BINARIES is not None
    result = distributed(BINARIES, default_model, [Loopback(), Loopback()], head_holds_layers=False,
                         n_prompt=0, n_gen=16, reps=1)

    assert result.n_devices == 2 and result.rpc_servers == 2 and result.head_layers == 0
    assert result.decode_tok_s > 0
    assert [r.test for r in result.runs] == ["tg16"]
    argv = list(result.argv)
    assert len(argv[argv.index("--rpc") + 1].split(",")) == 2
    assert "-ts" in argv  # the layers were split between the two servers, not left to free memory
    # Two servers and llama-bench were started; none of them outlives the run.
    assert len(result.pids) == 3
    alive = {row.pid for row in proc_table() if row.state != "Z"}
    assert not alive & set(result.pids)

