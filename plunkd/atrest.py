"""Data at rest: the data dir and everything plunkd writes there readable by its own user only, and the key
that seals the database's secrets (`storage.secrets`): loaded at start-up, checked against what the
database holds, and used to seal what is not sealed with it yet.

The key is `security.encryption_key` (with `security.previous_encryption_keys`), or else the key file
(`security.key_file`, default `<data_dir>/encryption.key`): one base64 key per line, the first seals, the
others still open. The key file is made on first start, unless the database already holds sealed secrets
(then the key is missing, which is an error, not a reason to make another).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.config import Config, sqlite_file
from core.files import private_dir, write_private_file
from core.keys import format_key, new_key, parse_key
from storage.secrets import (
    KeyRing,
    SecretsError,
    count_unsealed,
    foreign_key_ids,
    seal_batch,
    use_keyring,
)

log = logging.getLogger("plunkd")
SEAL_BATCH = 500
"""Secrets sealed per transaction (per column): a rotation interrupted between two keeps what is done."""
KEY_FILE_HEADER = ("# plunkd's encryption key: it seals the DKIM private keys and webhook secrets in the database.\n"
                   "# Back it up apart from the database: without it they cannot be read. The first key seals,\n"
                   "# any others only open secrets sealed before a rotation (plunkd secrets rotate).\n")
CONFIG_KEY_SOURCE = "security.encryption_key (PLUNKD_SECURITY_ENCRYPTION_KEY)"
MAX_LISTED = 8
"""Paths named in the warning about files made private; the rest are counted."""


def _sqlite_files(config: Config) -> list[Path]:
    database = sqlite_file(config.database_url)
    return [Path(database + suffix) for suffix in ("", "-wal", "-shm", "-journal")] if database else []


def _private_places(config: Config) -> tuple[list[Path], list[Path]]:
    """(directories walked whole, single files) that hold what plunkd writes."""
    trees = [config.data_path, config.outbox_path]
    files = [*_sqlite_files(config), config.key_file_path]
    return trees, files


def make_private(config: Config) -> list[str]:
    """Take group and other permissions away from the data dir, the outbox and every file and directory in
    them, the SQLite files and the key file (a umask only governs new files). Logs one warning naming what
    was changed (with its mode before) and returns those names."""
    trees, files = _private_places(config)
    private_dir(config.data_path)
    changed: list[str] = []
    failed: list[str] = []

    def fix(path: Path, info: os.stat_result) -> None:
        mode = stat.S_IMODE(info.st_mode)
        if not mode & 0o077:
            return
        try:
            os.chmod(path, mode & ~0o077)
        except OSError as exc:
            failed.append(f"{path} ({exc.strerror})")
            return
        changed.append(f"{path} (was {mode:04o})")

    seen: set[Path] = set()
    for top in trees:
        for root, _, names in os.walk(top):
            for entry in (root, *(os.path.join(root, name) for name in names)):
                path = Path(entry)
                if path in seen:
                    continue
                seen.add(path)
                try:
                    info = os.lstat(path)
                except FileNotFoundError:  # gone meanwhile (a staged .eml renamed)
                    continue
                if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                    fix(path, info)
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if path not in seen and stat.S_ISREG(info.st_mode):
                fix(path, info)
    if changed:
        more = f" and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
        log.warning("made private (group or others could read them): %s%s", ", ".join(changed[:MAX_LISTED]), more)
    if failed:
        log.warning("could not make private: %s", ", ".join(failed[:MAX_LISTED]))
    return changed


# ---------------------------------------------------------------------------------------------------
# The key ring.

def read_key_file(path: Path) -> list[bytes]:
    keys = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            keys.append(parse_key(text))
        except ValueError as exc:
            raise SecretsError(f"key file {path}, line {number}: {exc}") from None
    if not keys:
        raise SecretsError(f"key file {path} holds no key")
    return keys


def key_file_text(keys: list[bytes]) -> str:
    return KEY_FILE_HEADER + "".join(format_key(key) + "\n" for key in keys)


def load_keyring(config: Config) -> tuple[KeyRing, bool]:
    """The configured key ring, and whether its key is new: the key file does not exist (nothing is written
    yet: `save_new_key`)."""
    security = config.security
    if security.encryption_key:
        keys = [parse_key(security.encryption_key), *map(parse_key, security.previous_encryption_keys)]
        return KeyRing(keys, CONFIG_KEY_SOURCE), False
    path = config.key_file_path
    try:
        return KeyRing(read_key_file(path), f"key file {path}"), False
    except FileNotFoundError:
        return KeyRing([new_key()], f"key file {path}"), True
    except PermissionError:
        raise SecretsError(f"key file {path}: not readable by this user") from None


def save_new_key(config: Config, key: bytes) -> KeyRing:
    """Write a new key file, unless another process wrote one first: the ring of whichever file is there."""
    path = config.key_file_path
    write_private_file(path, key_file_text([key]), replace=False)
    return KeyRing(read_key_file(path), f"key file {path}")


def _missing_key(ring: KeyRing, foreign: set[str], new: bool, config: Config) -> SecretsError:
    ids = ", ".join(sorted(foreign))
    if new:
        return SecretsError(f"the database holds secrets sealed with key id {ids}, but the key file "
                            f"{config.key_file_path} does not exist: restore it from your backup (or set "
                            "security.encryption_key); no new key was made")
    return SecretsError(f"the database holds secrets sealed with key id {ids}, which {ring.source} does not hold "
                        f"(it holds key id {', '.join(ring.key_ids)}): start plunkd with the key they were sealed "
                        "with")


async def seal_all(db: Any, ring: KeyRing, progress: Callable[[int], None] | None = None) -> int:
    """Seal every stored secret not sealed with the ring's current key, SEAL_BATCH rows per transaction.
    Returns how many."""
    total = 0
    while True:
        done = await db.write(lambda s: seal_batch(s, ring, SEAL_BATCH), alone=True)
        if not done:
            return total
        total += done
        if progress is not None:
            progress(done)


async def open_secrets(db: Any, config: Config) -> KeyRing:
    """Load the key, refuse to go on when the database holds secrets sealed with a key it lacks (one line
    naming the key's source), make the key file if it is new, use the key in this process, and seal what
    is not sealed with it yet (plain text from before, or a previous key's secrets)."""
    ring, new = load_keyring(config)
    foreign = await db.read(foreign_key_ids, ring)
    if foreign:
        raise _missing_key(ring, foreign, new, config)
    if new:
        ring = save_new_key(config, ring.current_key)
        log.info("made the encryption key %s (key id %s): back it up apart from the database",
                 config.key_file_path, ring.current)
        foreign = await db.read(foreign_key_ids, ring)
        if foreign:
            raise _missing_key(ring, foreign, False, config)
    use_keyring(ring)
    sealed = await seal_all(db, ring)
    if sealed:
        log.warning("sealed %d secrets in the database with key id %s (%s)", sealed, ring.current, ring.source)
    return ring


async def rotate(db: Any, config: Config, counted: Callable[[int], None], sealed_some: Callable[[int], None]) -> str:
    """Seal every secret with a new key (key file) or with `security.encryption_key` (config), then drop the
    previous key from the key file; resumable: a rotation stopped midway is finished by the next one (or by
    the next start) with the same new key. Returns what was done, for the operator."""
    path = config.key_file_path
    if not config.security.encryption_key and not path.exists():
        raise SecretsError(f"key file {path} does not exist: nothing to rotate")
    ring, _ = load_keyring(config)
    foreign = await db.read(foreign_key_ids, ring)
    if foreign:
        raise _missing_key(ring, foreign, False, config)
    if not config.security.encryption_key and len(ring.key_ids) == 1:
        keys = [new_key(), ring.current_key]
        write_private_file(path, key_file_text(keys))  # before anything is sealed with it
        ring = KeyRing(keys, ring.source)
    dropped = [kid for kid in ring.key_ids if kid != ring.current]
    use_keyring(ring)
    counted(await db.read(count_unsealed, ring))
    sealed = await seal_all(db, ring, sealed_some)
    if config.security.encryption_key:
        advice = (f"security.previous_encryption_keys (key id {', '.join(dropped)}) are no longer needed: "
                  "remove them" if dropped else "")
    else:
        write_private_file(config.key_file_path, key_file_text([ring.current_key]))
        advice = f"key id {', '.join(dropped)} removed from {config.key_file_path}"
    return "; ".join(filter(None, [f"sealed {sealed} secrets with key id {ring.current} ({ring.source})", advice]))
