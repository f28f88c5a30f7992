"""LMDB access shared by the txt_db and img_db readers and writers.

Readers never hold an ``lmdb.Environment`` themselves: they ask :func:`open_readonly` on every
access, which returns one environment per (process, directory). That keeps reader objects
picklable (spawned DataLoader workers) and lets each forked worker or rank open its own
environment, as LMDB requires.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Self

import lmdb

from utils.errors import MissingPathError, UserError

# Readers do not take LMDB's lock (lock=False), so this only bounds the reader table of
# environments that other tools open with locking; DataLoader workers x ranks can be many.
_MAX_READERS = 2048
_WRITE_MAP_SIZE = 1 << 30  # grows on demand in LmdbWriter
_COMMIT_EVERY = 1000


class CorruptRecordError(UserError, ValueError):
    """A stored value cannot be decoded; the message names the database and the key."""


def require_lmdb_dir(path: str, what: str) -> str:
    """Checks that ``path`` is an LMDB directory and returns its absolute path.

    Args:
        path: directory that should hold ``data.mdb``.
        what: human-readable kind of database, used in the error message.

    Raises:
        FileNotFoundError: naming the directory and the expected ``data.mdb``.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"{what} directory not found: {path} (expected an LMDB "
                               f"directory containing data.mdb)")
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise MissingPathError(f"{what} {path} is not an LMDB directory: expected file "
                               f"data.mdb is missing")
    return path


def open_readonly(path: str) -> lmdb.Environment:
    """Returns the read-only environment of ``path`` for the calling process.

    py-lmdb refuses to open the same environment twice in one process, so environments are
    shared by every reader of the same directory in a process. The data file's inode is part
    of the key so that a database rebuilt at the same path is opened afresh.
    """
    path = os.path.abspath(path)
    try:
        inode = os.stat(os.path.join(path, "data.mdb")).st_ino
    except FileNotFoundError:
        require_lmdb_dir(path, "LMDB")
        raise
    return _open_cached(path, inode, os.getpid())


# An lru_cache rather than a dict on the readers: the environment must be shared by all
# readers of one directory in a process (two ImgDb objects on the same Flickr30k img_db would
# otherwise fail to open), and the pid in the key gives each forked worker its own.
@functools.cache
def _open_cached(path: str, inode: int, pid: int) -> lmdb.Environment:
    del inode, pid  # cache key only
    return lmdb.open(path, readonly=True, lock=False, readahead=False, create=False,
                     max_readers=_MAX_READERS, subdir=True)


# A forked child inherits the parent's open environments, and py-lmdb's "already open in this
# process" guard then refuses the child's own open of the same files. Dropping the inherited
# cache entries in the child releases them before the child opens its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_open_cached.cache_clear)


def read_value(path: str, key: str) -> bytes | None:
    """Returns the value stored under ``key`` (UTF-8 encoded) in the LMDB at ``path``."""
    with open_readonly(path).begin() as txn:
        return txn.get(key.encode("utf-8"))


def iter_keys(path: str) -> list[str]:
    """Returns every key of the LMDB at ``path``, decoded as UTF-8, in LMDB order."""
    with open_readonly(path).begin() as txn:
        return [bytes(k).decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)]


class LmdbWriter:
    """Writes string keys into a new LMDB directory, committing in batches.

    The memory map starts small and doubles whenever LMDB reports it full, so no size needs
    to be guessed up front.
    """

    def __init__(self, path: str, commit_every: int = _COMMIT_EVERY) -> None:
        self.path = path
        self._env = lmdb.open(path, map_size=_WRITE_MAP_SIZE, subdir=True,
                              max_readers=_MAX_READERS)
        self._pending: list[tuple[bytes, bytes]] = []
        self._commit_every = commit_every

    def put(self, key: str, value: bytes) -> None:
        """Queues ``value`` under ``key``; written at the next batch commit."""
        self._pending.append((key.encode("utf-8"), value))
        if len(self._pending) >= self._commit_every:
            self.flush()

    def flush(self) -> None:
        """Commits the queued values, growing the map if needed."""
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v)
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
                continue
            self._pending = []

    def close(self) -> None:
        """Commits what is queued and closes the environment."""
        if self._env is None:
            return
        try:
            self.flush()
        finally:
            self._env.close()
            self._env = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def atomic_dir(target: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory next to ``target`` that becomes ``target`` on success.

    On an exception the temporary directory is removed and ``target`` is left untouched, so
    a converter never leaves a half-written database behind.

    Args:
        target: final directory path.
        overwrite: replace an existing ``target`` (only after the new one is complete).

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is False.
    """
    target = os.path.abspath(target)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True / --overwrite to "
                              f"replace it)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the database is meant to be shared
    try:
        yield tmp
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rename(target, os.path.join(old, "previous"))
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(os.path.join(old, "previous"), target)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
