"""One parser of /proc/<pid>/stat, for the readers of a process's state, start time and CPU
time (dataplane.segment's pid checks, agent.zygote_wait's progress samples)."""

from __future__ import annotations

# indexes into `stat_fields` (proc(5)'s field numbers minus 3: they start after "pid (comm)")
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
