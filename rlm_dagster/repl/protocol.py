"""The RPC channel between the host and the REPL worker.

Frames are a 4-byte big-endian length followed by UTF-8 JSON, over a pair of pipes. JSON
and Arrow IPC are the only decoders on either side, so nothing the worker sends can make
the host execute code (no pickle). DataFrames travel as base64 Arrow IPC streams.

    >>> import pyarrow as pa
    >>> decode_arrow(encode_arrow(pa.table({"x": [1, 2]}))).to_pydict()
    {'x': [1, 2]}
"""

from __future__ import annotations

import base64
import json
import os
import select
import struct
import time
from typing import Any

import pyarrow as pa

MAX_FRAME_BYTES = 512 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ChannelClosed(EOFError):
    """The other side closed its end of the channel."""


class ChannelTimeout(TimeoutError):
    """No complete frame arrived within the timeout."""


class FrameReader:
    """Reads frames from a raw file descriptor, with an optional timeout per frame."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()

    def _fill(self, n: int, deadline: float | None) -> None:
        while len(self._buf) < n:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChannelTimeout()
                ready, _, _ = select.select([self.fd], [], [], remaining)
                if not ready:
                    raise ChannelTimeout()
            chunk = os.read(self.fd, max(65536, n - len(self._buf)))
            if not chunk:
                raise ChannelClosed()
            self._buf.extend(chunk)

    def read(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._fill(_HEADER.size, deadline)
        (size,) = _HEADER.unpack(self._buf[: _HEADER.size])
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
        self._fill(_HEADER.size + size, deadline)
        payload = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        message = json.loads(payload)
        if not isinstance(message, dict):
            raise ValueError("frame is not a JSON object")
        return message


def write_frame(fd: int, message: dict[str, Any]) -> None:
    payload = json.dumps(message, ensure_ascii=False, default=str).encode("utf-8")
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(
            f"message of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES} byte limit"
        )
    view = memoryview(_HEADER.pack(len(payload)) + payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def encode_arrow(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def decode_arrow(data: str) -> pa.Table:
    with pa.ipc.open_stream(pa.py_buffer(base64.b64decode(data))) as reader:
        return reader.read_all()
