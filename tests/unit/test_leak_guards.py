"""The leak guards themselves (tests/harness/guards.py): each case runs a small test file in
its own pytest process, with the guards, and reads that run's outcome, so that a guard
firing is observed without failing this suite."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import processes

REPO = Path(__file__).resolve().parents[2]

CONFTEST = """
from tests.harness import guards

def pytest_configure(config):
    guards.register(config)
"""


def _run(tmp_path: Path, body: str) -> tuple[dict[str, int], str]:
    """Run `body` as a test module under the guards: the outcome counts and the output."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_case.py").write_text(textwrap.dedent(body))
    done = processes.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          "-o", "addopts=", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                              "EDGEMESH_LEAK_GRACE_S": "1"})
    out = done.stdout + done.stderr
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?)", out)}
    counts["errors"] = counts.pop("error", 0) + counts.get("errors", 0)
    return counts, out


def test_a_leaked_thread_fails_its_test(tmp_path: Path) -> None:
    counts, out = _run(tmp_path, """
        import threading

        stop = threading.Event()

        def test_leaks_a_thread():
            threading.Thread(target=stop.wait, name="forgotten-worker", daemon=True).start()

        def test_after_it_is_unaffected():
            stop.set()
    """)
    assert counts.get("passed") == 2 and counts["errors"] == 1, out
    assert "test_leaks_a_thread leaked" in out and "forgotten-worker" in out, out


def test_a_thread_that_ends_within_the_grace_period_is_not_a_leak(tmp_path: Path) -> None:
    counts, out = _run(tmp_path, """
        import threading, time

        def test_starts_a_short_thread():
            threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()
    """)
    assert counts.get("passed") == 1 and counts["errors"] == 0, out


def test_a_leaked_child_process_fails_its_test_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    counts, out = _run(tmp_path, f"""
        import subprocess

        def test_leaks_a_child():
            child = subprocess.Popen(["sleep", "60"])
            open({str(pid_file)!r}, "w").write(str(child.pid))
    """)
    assert counts.get("passed") == 1 and counts["errors"] == 1, out
    assert "child process" in out and "sleep 60" in out, out
    assert not Path(f"/proc/{pid_file.read_text()}").exists(), "the guard did not end the leaked child"


def test_an_orphaned_grandchild_is_caught(tmp_path: Path) -> None:
    """The child exits at once and its own child is reparented: to init it would vanish from
    view; to the guard's process (a child subreaper) it is a leak like any other."""
    counts, out = _run(tmp_path, """
        import subprocess

        def test_leaks_a_grandchild():
            subprocess.run(["sh", "-c", "sleep 61 & exit 0"], check=True)
    """)
    assert counts["errors"] == 1 and "sleep 61" in out, out


def test_a_leaked_asyncio_task_fails_its_test(tmp_path: Path) -> None:
    counts, out = _run(tmp_path, """
        import asyncio

        def test_leaves_a_loop_with_a_pending_task():
            loop = asyncio.new_event_loop()
            loop.create_task(asyncio.sleep(60), name="never-awaited")
            loop.run_until_complete(asyncio.sleep(0))
            test_leaves_a_loop_with_a_pending_task.loop = loop  # kept alive: the task is too
    """)
    assert counts["errors"] == 1 and "never-awaited" in out, out


def test_a_module_fixtures_process_belongs_to_the_fixture_until_its_teardown(tmp_path: Path) -> None:
    counts, out = _run(tmp_path, """
        import subprocess
        import pytest

        @pytest.fixture(scope="module")
        def server():
            child = subprocess.Popen(["sleep", "60"])
            yield child
            child.terminate()
            child.wait()

        def test_one(server):
            assert server.poll() is None

        def test_two(server):
            assert server.poll() is None
    """)
    assert counts.get("passed") == 2 and counts["errors"] == 0, out


def test_a_process_started_through_another_fixture_of_the_scope_is_that_scopes(tmp_path: Path) -> None:
    """As page_url starts its gateway through module_launcher, which ends it after page_url's teardown."""
    counts, out = _run(tmp_path, """
        import subprocess
        import pytest

        @pytest.fixture(scope="module")
        def launcher():
            started = []
            yield started
            for child in started:
                child.terminate()
                child.wait()

        @pytest.fixture(scope="module")
        def server(launcher):
            launcher.append(subprocess.Popen(["sleep", "60"]))
            yield launcher[-1]

        def test_one(server):
            assert server.poll() is None
    """)
    assert counts.get("passed") == 1 and counts["errors"] == 0, out


def test_a_module_fixture_that_leaves_its_process_running_fails_at_its_teardown(tmp_path: Path) -> None:
    counts, out = _run(tmp_path, """
        import subprocess
        import pytest

        @pytest.fixture(scope="module")
        def server():
            yield subprocess.Popen(["sleep", "62"])

        def test_one(server):
            assert server.poll() is None
    """)
    assert counts["errors"] == 1, out
    assert "module-scoped fixture 'server' left running after its scope's teardown" in out, out
    assert "sleep 62" in out, out


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_stop_group_ends_grandchildren(tmp_path: Path, signal_name: str) -> None:
    """What the launchers rely on: ending a process ends all it started, even when it does not
    pass the signal on."""
    import signal

    ready = tmp_path / "ready"
    leader = processes.popen(["sh", "-c", f"sleep 63 & echo $! > {ready}; wait"])
    while not (ready.exists() and ready.read_text().strip()):
        assert leader.poll() is None
    grandchild = int(ready.read_text())
    assert Path(f"/proc/{grandchild}").exists()
    processes.stop_group(leader, getattr(signal, signal_name), grace_s=10)
    assert leader.returncode is not None
    assert processes.group_members(leader.pid) == []
