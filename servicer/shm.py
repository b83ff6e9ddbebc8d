"""Attach tensors a same-host gateway published in POSIX shared memory (`TensorData.shm`).

Names are treated as hostile: a bare file name under /dev/shm (no '/', '..' or NUL),
opened with O_NOFOLLOW, a regular file, the payload within it. The payload is read
through a read-only memory map, without a copy, until the single cast to the model
dtype. A segment is unlinked once consumed (SMG's contract: the worker owns cleanup),
unless the operator keeps them for debugging.
"""

import mmap
import os
import re
import stat
import threading
from collections import OrderedDict

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"[A-Za-z0-9_.:@+=-]{1,255}")


class ShmError(Exception):
    """A segment that cannot be used; `missing` when it does not exist (anymore)."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in (".", "..") or ".." in name:
        raise ShmError(f"name {name!r} is not a plain /dev/shm segment name")
    return name


def attach(name: str, offset: int, nbytes: int, unlink: bool) -> memoryview:
    """A read-only view of `nbytes` at `offset` in the segment; the mapping lives as long as the view."""
    path = os.path.join(SHM_DIR, check_name(name))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ShmError(f"segment {name!r} does not exist (already consumed?)", missing=True) from None
    except OSError as exc:
        raise ShmError(f"segment {name!r} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ShmError(f"segment {name!r} is not a regular file")
        if offset + nbytes > info.st_size:
            raise ShmError(f"offset {offset} + nbytes {nbytes} is beyond the segment's {info.st_size} bytes")
        if nbytes == 0:
            return memoryview(b"")
        mapping = mmap.mmap(fd, offset + nbytes, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        if unlink:
            _unlink(path)
    return memoryview(mapping)[offset : offset + nbytes]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def namespace_id() -> str:
    """This process's /dev/shm identity, `<boot_id>:<st_dev>`: equal for processes that share it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return f"{boot_id}:{os.stat(SHM_DIR).st_dev}"
    except OSError:
        return ""


class ConsumedSegments:
    """Which identities each consumed segment carried, so a gateway retry naming it can be served from the store."""

    def __init__(self, capacity: int = 4096):
        self._names: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def remember(self, name: str, identities: tuple[str, ...]) -> None:
        with self._lock:
            self._names[name] = identities
            self._names.move_to_end(name)
            while len(self._names) > self._capacity:
                self._names.popitem(last=False)

    def identities(self, name: str) -> tuple[str, ...] | None:
        with self._lock:
            return self._names.get(name)
