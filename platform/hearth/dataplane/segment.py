"""The slot pool's segment file in ``/dev/shm``: its header layout, who made it, and cleanup.

One POSIX shared-memory segment per node (a file in ``/dev/shm``, mode 0600, created with
``O_CREAT|O_EXCL`` and mapped with ``mmap``; ``multiprocessing.shared_memory`` is not used
because its resource tracker unlinks segments behind our back). The segment holds:

=============  ==============================================================================
offset         contents
=============  ==============================================================================
0              header (one page): magic, version, creator pid + start time, size classes
4096           slot table: one 48-byte row per slot (state, refcount, gen, owner pid,
               length, handed-by pid, owner start time, handed-by start time) -- shared by
               every process on the node
data_offset    slot data, page aligned; classes in ascending size, slots of a class adjacent
=============  ==============================================================================

Processes are named by pid and start time (``/proc/<pid>/stat``), so a reused pid is not taken
for the process that made a segment or owns a slot. :func:`cleanup_stale_segments` removes
segments whose creator is gone; :func:`create_segment` makes one. The allocator over this layout
is :mod:`hearth.dataplane.shm`.

A pid only names a process in its own pid namespace, and ``/dev/shm`` is shared across them (a
node agent in a container with the host's ``/dev/shm``, a joined pod, the tests' ``unshare``d
creators): the pid 1 recorded by a creator in a container is another process in the host's
``/proc``, and a host pid is no process at all in the container's. So the creator also holds a
write lock on the segment's first byte for its life (an open-file-description lock on its own
descriptor: the kernel drops it when that descriptor closes, i.e. at the latest when the
creator dies, in any namespace, and closing another descriptor of the file does not drop it).
A segment is stale only when nobody holds that lock *and* its pid and start time name no
process here (:func:`segment_alive`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct

TYPE_CHECKING = False  # no typing import on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

SHM_DIR = "/dev/shm"
PAGE = mmap.PAGESIZE
MAGIC = b"HEARTHP1"
# 2: per-class first-free hints in the header; 3: a row's length is a u32, then who handed it
# over; 4: and that process's start time (rows of 48 bytes)
VERSION = 4
HEADER_SIZE = 4096
MAX_CLASSES = 32
_TRIM_OFF = 1024  # header offset of the creator's trim threshold (u64; 0 = not recorded)
_HINT_OFF = 2048  # header offset of the per-class first-free hints (u32 each, class-relative)

# header: magic, version, creator pid, creator start, nclasses, nslots, table_off, data_off, total
_HDR = struct.Struct("<8sIIQIIQQQ")
_CLS = struct.Struct("<QIIQ")  # slot size, count, first index, data offset of first slot
_CLS_OFF = 64
# struct flock (Linux, 64-bit): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_FLOCK = struct.Struct("hhqqi4x")

FREE, USED = 0, 1
# one table row: state, refcount, gen, owner, length, handed by (u32 each), owner start time,
# handed-by start time (u64 each), 8 bytes unused
ROW_SIZE = 48
ROW_U32 = ROW_SIZE // 4  # a row's words in the table's u32 view (row i starts at ROW_U32 * i)
ROW_U64 = ROW_SIZE // 8  # ... and in its u64 view


# indexes into `stat_fields`: proc(5)'s field numbers minus 3 (they start after "pid (comm)").
# The one parser of /proc/<pid>/stat: agent.zygote_wait reads CPU time and state through it.
STATE, UTIME, STIME, STARTTIME = 0, 11, 12, 19


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after "pid (comm) " (the command name may hold spaces
    and parentheses: the last ")" ends it), None if the process is gone or the line is not one
    (too short to hold the start time). Other errors than a missing process are raised."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    end = raw.rfind(b")")
    fields = raw[end + 2 :].split() if end >= 0 else []
    return fields if len(fields) > STARTTIME else None


def proc_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``; None if gone or a zombie. With the pid,
    it names a process for good (slot owners; the agent's check of a joining pod's claim)."""
    fields = stat_fields(pid)
    if fields is None or fields[STATE] in (b"Z", b"X"):
        return None
    return int(fields[STARTTIME])


def pid_alive(pid: int, start: int = 0) -> bool:
    """True if ``pid`` runs and (when ``start`` is known) is the same process as recorded."""
    if pid <= 0:
        return False
    st = proc_start(pid)
    if st is None:
        return False
    return start == 0 or st == start


class _Me:
    """This process's pid and start time. ``os.getpid()`` is a system call, and slot
    operations ask several times per invocation; a forked child reads its own again."""

    pid = os.getpid()
    start: int | None = None


def _forked() -> None:
    _Me.pid = os.getpid()
    _Me.start = None


os.register_at_fork(after_in_child=_forked)


def _my_start() -> int:
    if _Me.start is None:
        _Me.start = proc_start(_Me.pid) or 0
    return _Me.start


def _check_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise ValueError(f"invalid pool name {name!r}: must be a plain file name, no '/'")
    return name


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def segment_info(path: str) -> dict[str, Any] | None:
    """Header fields of a segment file, or None if it is not a Hearth pool."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(_HDR.size)
    except OSError:
        return None
    if len(hdr) < _HDR.size:
        return None
    magic, version, cpid, cstart, ncls, nslots, _t, _d, total = _HDR.unpack(hdr)
    if magic != MAGIC:
        return None
    return {
        "creator_pid": cpid,
        "creator_start": cstart,
        "version": version,
        "slots": nslots,
        "virtual_bytes": total,
    }


def _creator_lock(op: int, fd: int, kind: int) -> bytes:
    return fcntl.fcntl(fd, op, _FLOCK.pack(kind, os.SEEK_SET, 0, 1, 0))


def creator_lock_held(path: str) -> bool:
    """Whether some process holds the creator's lock on the segment ``path`` (see the module
    docstring): true for a live creator in any pid namespace that shares this ``/dev/shm``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        kind = _FLOCK.unpack(_creator_lock(fcntl.F_OFD_GETLK, fd, fcntl.F_WRLCK))[0]
    finally:
        os.close(fd)
    return kind != fcntl.F_UNLCK


def segment_alive(path: str, info: dict[str, Any]) -> bool:
    """Whether the creator of the segment ``path`` (header ``info``) may still run: it holds
    the creator's lock, or its pid and start time name a live process in this pid namespace
    (a creator that closed its pool but runs; segments of builds without the lock). Stale
    means neither, so a live creator in another pid namespace (it holds the lock) never is,
    whatever its pid names here."""
    return creator_lock_held(path) or pid_alive(info["creator_pid"], info["creator_start"])


def cleanup_stale_segments(prefix: str = "hearth-") -> list[str]:
    """Unlink pool segments named ``prefix*`` whose creator process is dead
    (:func:`segment_alive`: never one whose creator runs in another pid namespace); returns
    names.

    Half-made segments (no valid header yet) are removed only if older than 60 s.
    """
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    import time

    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(SHM_DIR, name)
        if not os.path.isfile(path):  # a directory or socket with our prefix is not a segment
            continue
        info = segment_info(path)
        if info is None:
            try:
                if time.time() - os.stat(path).st_mtime < 60:
                    continue
            except OSError:
                continue
        elif segment_alive(path, info):
            continue
        try:
            os.unlink(path)
            removed.append(name)
        except OSError as e:
            # gone already, or another user's (the sticky /dev/shm: not ours to remove; a
            # node agent's start must not fail on it)
            if e.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):
                raise
    return removed


def create_segment(name: str, classes: list[tuple[int, int]], trim: int) -> tuple[int, mmap.mmap]:
    """Create and map the segment ``SHM_DIR/<name>`` (0600) for ``classes`` (``(slot size,
    count)``, sizes page multiples, ascending) with this process as its creator; its fd and
    mapping. Leftovers of a dead creator of the same name are removed; a segment whose creator
    is alive, or a file that is not a segment, raises ``FileExistsError``. The header is
    written last, its magic at the very end, so a half-made segment never looks valid."""
    norm = classes
    nslots = sum(c for _, c in norm)
    table_off = HEADER_SIZE
    data_off = -(-(table_off + nslots * ROW_SIZE) // PAGE) * PAGE
    path = os.path.join(SHM_DIR, name)
    if os.path.exists(path):
        info = segment_info(path)
        if info is None:
            raise FileExistsError(f"{path} exists and is not a Hearth slot pool; not touching it")
        if segment_alive(path, info):
            raise FileExistsError(
                f"slot pool {name!r} exists and its creator pid {info['creator_pid']} is alive"
            )
        _unlink(path)  # leftovers of a dead node agent
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # held on this descriptor (the pool's) until it closes: the creator's lock, taken
        # before the header is written, so no valid segment is ever without it
        _creator_lock(fcntl.F_OFD_SETLK, fd, fcntl.F_WRLCK)
        os.fchmod(fd, 0o600)  # umask-proof
        cls_rows, off, first = [], data_off, 0
        for size, count in norm:
            cls_rows.append((size, count, first, off))
            off += size * count
            first += count
        total = off
        os.ftruncate(fd, total)
        mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        pid = os.getpid()
        struct.pack_into("<Q", mm, _TRIM_OFF, trim)
        # write the header last-but-magic so a half-made segment never looks valid
        for i, row in enumerate(cls_rows):
            _CLS.pack_into(mm, _CLS_OFF + i * _CLS.size, *row)
        _HDR.pack_into(
            mm,
            0,
            b"\0" * 8,
            VERSION,
            pid,
            _my_start(),
            len(norm),
            nslots,
            table_off,
            data_off,
            total,
        )
        mm[0:8] = MAGIC
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    return fd, mm
