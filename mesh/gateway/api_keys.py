"""The gateway's bearer keys: --api-key and a file of named keys, re-read when it changes.

The file holds one `NAME KEY` per line; `#` starts a comment line, blank lines are
allowed. Names (never keys) label the per-key metrics. The file is checked for a change
(its mtime, size and inode) at most once per RELOAD_EVERY_S, on a request, so a removed key
stops working within about a second and an idle gateway does no work; the new key set
replaces the old one whole. A file that no longer parses leaves the previous keys in force
(and is logged and counted), since half a key file is worse than the last good one.

Keys are compared as SHA-256 digests with hmac.compare_digest, against every key without
stopping at the first match: the time taken says nothing about which key, or how much of
one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.errors import ConfigError
from mesh.metrics import GatewayMetrics

log = logging.getLogger(__name__)

FLAG_KEY_NAME = "api-key"  # the per-key metrics' name for the --api-key key
RELOAD_EVERY_S = 1.0
MAX_FILE_BYTES = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

Stamp = tuple[int, int, int]  # what says a file changed: mtime_ns, size, inode


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class NamedKey:
    name: str
    digest: bytes = field(repr=False)  # SHA-256 of the key: the key itself is not kept


def parse_key_file(text: str, where: str) -> tuple[NamedKey, ...]:
    """The keys of a key file's text; a ConfigError naming `where` and the line number for a
    line that is not `NAME KEY`, a name that is not a plain word, or a name or key given twice."""
    keys: list[NamedKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(f"{where} line {number}: expected 'NAME KEY' (two words), found {len(fields)} "
                              "word(s)")
        name, key = fields
        if not _NAME.fullmatch(name) or name == FLAG_KEY_NAME:
            raise ConfigError(f"{where} line {number}: the name {name!r} must be letters, digits and _ . @ - "
                              f"(at most 64, not {FLAG_KEY_NAME!r}, which names --api-key)")
        digest = _digest(key)
        if name in names:
            raise ConfigError(f"{where} line {number}: the name {name!r} is given twice")
        if digest in digests:
            raise ConfigError(f"{where} line {number}: this key is already given to another name")
        names.add(name)
        digests.add(digest)
        keys.append(NamedKey(name, digest))
    return tuple(keys)


class ApiKeys:
    """Which client a bearer key is: `identify(token)` gives its name, or None."""

    def __init__(self, flag_key: str = "", path: str = "", metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._flag = (NamedKey(FLAG_KEY_NAME, _digest(flag_key)),) if flag_key else ()
        self._path = path
        self._metrics = metrics
        self._clock = clock
        self._file_keys: tuple[NamedKey, ...] = ()
        self._stamp: Stamp | None = None
        self._checked_at = clock()
        if path:
            stamp = self._stamp_now()
            if stamp is None:
                raise ConfigError(f"--api-keys-file {path}: no such file (or it cannot be read)")
            self._file_keys = self._read(stamp)
            if not self._file_keys:
                raise ConfigError(f"--api-keys-file {path} has no keys: add lines of 'NAME KEY'")
            self._stamp = stamp
            log.info("API keys of %s: %s", path, ", ".join(k.name for k in self._file_keys))
        self._keys = self._flag + self._file_keys

    @property
    def required(self) -> bool:
        """Whether the API asks for a key at all (a loopback gateway may run without one)."""
        return bool(self._flag) or bool(self._path)

    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self._keys)

    def identify(self, token: str) -> str | None:
        self.reload_if_changed()
        digest = _digest(token)
        found: str | None = None
        for key in self._keys:  # every key, whatever matched: constant time in which one did
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.name
        return found

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed (checked at most once per RELOAD_EVERY_S); True when a
        new key set took effect."""
        if not self._path:
            return False
        now = self._clock()
        if now - self._checked_at < RELOAD_EVERY_S:
            return False
        self._checked_at = now
        stamp = self._stamp_now()
        if stamp == self._stamp:
            return False
        previous, self._stamp = self._stamp, stamp  # a broken file is reported once, not every second
        try:
            if stamp is None:
                raise ConfigError(f"{self._path} is gone (or cannot be read)")
            keys = self._read(stamp)
        except ConfigError as exc:
            log.error("API keys not reloaded, the previous ones stay in force: %s", exc)
            if self._metrics is not None:
                self._metrics.api_keys_reload_errors.inc()
            return False
        if previous is not None and not keys:
            log.warning("%s has no keys now: only --api-key (if any) is accepted", self._path)
        old = {k.name for k in self._file_keys}
        self._file_keys = keys
        self._keys = self._flag + keys
        new = {k.name for k in keys}
        log.info("API keys of %s reloaded: %d key(s); added %s, removed %s", self._path, len(keys),
                 ", ".join(sorted(new - old)) or "none", ", ".join(sorted(old - new)) or "none")
        return True

    def _stamp_now(self) -> Stamp | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self, stamp: Stamp) -> tuple[NamedKey, ...]:
        path = self._path
        if stamp[1] > MAX_FILE_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES} bytes; is it the right file?")
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        if stat.S_IMODE(mode) & 0o077:
            log.warning("%s can be read by other users (mode %o): `chmod 600 %s`", path, stat.S_IMODE(mode), path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start})") from None
        keys = parse_key_file(text, path)
        if self._flag and any(k.digest == self._flag[0].digest for k in keys):
            raise ConfigError(f"{path}: a key in it is also --api-key's; give each key one name")
        return keys
