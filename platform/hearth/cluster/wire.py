"""The agent-to-agent link's wire: what ``link.py`` (the calling side) and ``serve.py`` (the
serving side) use of it, addressed as ``wire.X``.

After a mutual HMAC handshake (``handshake.py``), a connection carries frames
``[header 24 B][meta][data]`` (``framing.py``: the format and its limits). Data moves without
copies in Python: frames go out as one gather ``sendmsg`` straight from the slot's memoryview
(``writer.py``) and data lands with ``recv_into`` straight into the destination slot
(``reader.py``).
"""

from __future__ import annotations

from hearth.cluster.framing import (
    BUF,
    BULK,
    ERR,
    HEADER,
    MAX_META,
    PING,
    PONG,
    REP,
    REQ,
    STREAM,
    AuthError,
    Dest,
    Frame,
    LinkError,
    Sink,
    frame,
)
from hearth.cluster.handshake import handshake_client, handshake_server, tune
from hearth.cluster.reader import Reader, copy_in, read_in
from hearth.cluster.writer import (
    Progress,
    WriteLock,
    send_all,
    send_frame,
    send_now,
    send_rest,
)

__all__ = [
    "BUF",
    "BULK",
    "ERR",
    "HEADER",
    "MAX_META",
    "PING",
    "PONG",
    "REP",
    "REQ",
    "STREAM",
    "AuthError",
    "Dest",
    "Frame",
    "LinkError",
    "Progress",
    "Reader",
    "Sink",
    "WriteLock",
    "copy_in",
    "frame",
    "handshake_client",
    "handshake_server",
    "read_in",
    "send_all",
    "send_frame",
    "send_now",
    "send_rest",
    "tune",
]
