"""The RPC channel between the host and the REPL worker.

Frames are a 4-byte big-endian length followed by UTF-8 JSON, over a pair of pipes. JSON is
the only decoder on either side, so nothing the worker sends can make the host execute
code (no pickle). DataFrames travel as tagged JSON columns (:func:`encode_frame`), which
pandas alone can read: the worker never loads pyarrow, whose native file I/O would bypass
its audit hooks. The host converts between those frames and Arrow (:func:`frame_to_arrow`).

    >>> import pandas as pd
    >>> decode_frame(encode_frame(pd.DataFrame({"x": [1, 2]})))["x"].tolist()
    [1, 2]

Everything the host reads from the worker is untrusted: :func:`decode_frame` checks every
field and raises :class:`ProtocolError` (a ``ValueError``) on anything malformed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import json
import math
import os
import select
import struct
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import pyarrow as pa

MAX_FRAME_BYTES = 512 * 1024 * 1024
"""Largest frame the host sends (``sql()`` results)."""
MAX_WORKER_FRAME_BYTES = 64 * 1024 * 1024
MAX_FRAME_ROWS = 10_000_000
MAX_FRAME_COLUMNS = 10_000
FAMILIES = ("SQLPolicyError", "QueryError", "BudgetExceeded", "ModelError", "UnknownTableError")
"""The host error classes the REPL namespace binds; an error reply names the one its error
descends from (``family``), so model code catches a ProviderOverloaded as a ModelError."""
"""Largest frame the worker may send (FINAL values): parsing JSON costs the host several
times its size in memory."""
_HEADER = struct.Struct(">I")
_MAX_DEPTH = 32
_NULL_INT = np.iinfo(np.int64).min  # NaT's int64 value
_NULLABLE_DTYPES = frozenset(
    {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float32",
     "Float64", "boolean"}
)  # fmt: skip


class ChannelClosed(EOFError):
    """The other side closed its end of the channel."""


class ChannelTimeout(TimeoutError):
    """No complete frame arrived (or could be sent) within the timeout."""


class ProtocolError(ValueError):
    """A frame, or a value inside one, is not what the protocol allows."""


class FrameReader:
    """Reads frames from a raw file descriptor, with an optional timeout per frame."""

    def __init__(self, fd: int, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.fd = fd
        self.max_bytes = max_bytes
        self._buf = bytearray()

    @property
    def buffered(self) -> bool:
        """Whether bytes of a next frame have already arrived."""
        return bool(self._buf)

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
        """The next frame as a dict; :class:`ProtocolError` if it is not a JSON object."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._fill(_HEADER.size, deadline)
        (size,) = _HEADER.unpack(self._buf[: _HEADER.size])
        if size > self.max_bytes:
            raise ProtocolError(f"frame of {size} bytes exceeds the {self.max_bytes} byte limit")
        self._fill(_HEADER.size + size, deadline)
        payload = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        try:
            message = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"frame is not valid JSON ({type(exc).__name__})") from None
        if not isinstance(message, dict):
            raise ProtocolError("frame is not a JSON object")
        return message


def write_frame(
    fd: int,
    message: dict[str, Any],
    timeout: float | None = None,
    max_bytes: int = MAX_FRAME_BYTES,
) -> None:
    """Send ``message``. With ``timeout`` on a non-blocking descriptor, :class:`ChannelTimeout`
    if the reader does not take it in time."""
    payload = json.dumps(message, ensure_ascii=False, default=str).encode("utf-8")
    if len(payload) > max_bytes:
        raise ValueError(
            f"the value is too large to send ({len(payload) / 1e6:,.1f} MB; the limit is "
            f"{max_bytes / 1e6:,.0f} MB). Send fewer rows, or a table handle."
        )
    view = memoryview(_HEADER.pack(len(payload)) + payload)
    deadline = None if timeout is None else time.monotonic() + timeout
    while view:
        # A non-blocking descriptor whose reader is behind raises: wait for it below.
        with contextlib.suppress(BlockingIOError):
            view = view[os.write(fd, view) :]
        if view:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            _, ready, _ = select.select([], [fd], [], remaining)
            if not ready:
                raise ChannelTimeout()


# -- DataFrames as JSON ------------------------------------------------------------------------


def encode_frame(df: pd.DataFrame) -> dict[str, Any]:
    """``df`` as ``{"rows": n, "columns": [{"name", "dtype", "values", ...}]}`` (JSON-safe).

    >>> encode_frame(pd.DataFrame({"n": [1, 2]}))
    {'rows': 2, 'columns': [{'name': 'n', 'dtype': 'int64', 'values': [1, 2]}]}
    """
    columns = []
    for position, name in enumerate(df.columns):
        columns.append({"name": str(name), **_encode_column(df.iloc[:, position])})
    return {"rows": len(df), "columns": columns}


def _encode_column(s: pd.Series) -> dict[str, Any]:
    dtype = s.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        return {"dtype": str(dtype), "values": s.tolist()}
    if dtype.kind in "mM":
        unit = getattr(dtype, "unit", None) or np.datetime_data(cast(np.dtype, dtype))[0]
        tz = getattr(dtype, "tz", None)
        ints = s.array.asi8 if tz is not None else s.to_numpy().view("int64")
        values = [None if v == _NULL_INT else int(v) for v in ints]
        kind = "datetime" if dtype.kind == "M" else "timedelta"
        return {
            "dtype": kind,
            "unit": unit,
            "tz": None if tz is None else str(tz),
            "values": values,
        }
    if isinstance(dtype, pd.CategoricalDtype):
        return {"dtype": "category", "values": [_tag(v) for v in s.astype(object)]}
    if str(dtype) in _NULLABLE_DTYPES:
        return {"dtype": str(dtype), "values": [None if v is pd.NA else v for v in s.tolist()]}
    if isinstance(dtype, pd.StringDtype):
        return {"dtype": "str", "values": [None if pd.isna(v) else str(v) for v in s]}
    return {"dtype": "object", "values": [_tag(v) for v in s]}


def _tag(value: Any, depth: int = 0) -> Any:
    """A cell of an object column as JSON, with a ``{"$": kind}`` tag for non-JSON types."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, np.generic):
        return _tag(value.item(), depth)
    if value is pd.NA or value is pd.NaT:
        return None
    if depth >= _MAX_DEPTH:
        return str(value)
    if isinstance(value, pd.Timestamp):
        return {"$": "timestamp", "v": value.isoformat()}
    if isinstance(value, dt.datetime):
        return {"$": "datetime", "v": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$": "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$": "time", "v": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$": "timedelta", "us": value // dt.timedelta(microseconds=1)}
    if isinstance(value, decimal.Decimal):
        return {"$": "decimal", "v": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$": "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {
            "$": "dict",
            "items": [[_tag(k, depth + 1), _tag(v, depth + 1)] for k, v in value.items()],
        }
    if isinstance(value, list | tuple | np.ndarray):
        return [_tag(v, depth + 1) for v in value]
    return str(value)


def decode_frame(payload: Any) -> pd.DataFrame:
    """The DataFrame :func:`encode_frame` encoded; :class:`ProtocolError` if malformed."""
    if not isinstance(payload, dict):
        raise ProtocolError("a frame must be a JSON object")
    rows, columns = payload.get("rows"), payload.get("columns")
    if type(rows) is not int or rows < 0 or not isinstance(columns, list):
        raise ProtocolError("a frame needs 'rows' (int) and 'columns' (list)")
    # Checked before anything is allocated for them: a forged count is not a size.
    if rows > MAX_FRAME_ROWS or len(columns) > MAX_FRAME_COLUMNS or (rows and not columns):
        raise ProtocolError(
            f"a frame may have at most {MAX_FRAME_ROWS:,} rows and {MAX_FRAME_COLUMNS:,} "
            "columns, and rows only with columns"
        )
    names: list[str] = []
    series: list[pd.Series] = []
    for column in columns:
        if not isinstance(column, dict) or not isinstance(column.get("name"), str):
            raise ProtocolError("each frame column needs a 'name'")
        values = column.get("values")
        if not isinstance(values, list) or len(values) != rows:
            raise ProtocolError(f"column {column['name']!r} does not have {rows} values")
        names.append(column["name"])
        series.append(_decode_column(column, values))
    df = pd.DataFrame({i: s for i, s in enumerate(series)}, index=pd.RangeIndex(rows))
    df.columns = pd.Index(names, dtype=object)
    return df


def _decode_column(column: dict[str, Any], values: list[Any]) -> pd.Series:
    dtype = column.get("dtype")
    try:
        if dtype in ("datetime", "timedelta"):
            unit = str(column.get("unit"))
            if unit not in ("s", "ms", "us", "ns"):
                raise ProtocolError(f"unknown time unit {unit!r}")
            ints = np.array([_NULL_INT if v is None else int(v) for v in values], dtype="int64")
            kind = "M" if dtype == "datetime" else "m"
            s = pd.Series(ints.view(f"{kind}8[{unit}]"))
            tz = column.get("tz")
            return s.dt.tz_localize("UTC").dt.tz_convert(str(tz)) if tz else s
        if dtype == "str":
            return pd.Series([None if v is None else str(v) for v in values], dtype="str")
        if dtype == "category":
            return pd.Series([_untag(v) for v in values], dtype=object).astype("category")
        if dtype == "object":
            return pd.Series([_untag(v) for v in values], dtype=object)
        if dtype in _NULLABLE_DTYPES:
            return pd.Series(pd.array(values, dtype=cast(Any, dtype)))
        if isinstance(dtype, str) and np.dtype(dtype).kind in "biuf":
            if any(isinstance(v, dict | list | str) for v in values):
                raise ProtocolError(f"column of dtype {dtype} holds a non-number")
            return pd.Series(values, dtype=dtype)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"column {column.get('name')!r}: {exc}") from None
    raise ProtocolError(f"column {column.get('name')!r} has unknown dtype {dtype!r}")


def _untag(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ProtocolError("values are nested too deeply")
    if isinstance(value, list):
        return [_untag(v, depth + 1) for v in value]
    if not isinstance(value, dict):
        if isinstance(value, float) and math.isnan(value):
            return None
        return value
    kind, text = value.get("$"), value.get("v")
    if kind == "dict" and isinstance(value.get("items"), list):
        out = {}
        for pair in value["items"]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ProtocolError("a dict item must be a [key, value] pair")
            key = _untag(pair[0], depth + 1)
            out[key if isinstance(key, str | int | float | bool) or key is None else str(key)] = (
                _untag(pair[1], depth + 1)
            )
        return out
    if kind == "timedelta" and type(value.get("us")) is int:
        return dt.timedelta(microseconds=value["us"])
    if not isinstance(text, str):
        raise ProtocolError(f"malformed tagged value {str(value)[:80]}")
    try:
        if kind == "timestamp":
            return pd.Timestamp(text)
        if kind == "datetime":
            return dt.datetime.fromisoformat(text)
        if kind == "date":
            return dt.date.fromisoformat(text)
        if kind == "time":
            return dt.time.fromisoformat(text)
        if kind == "decimal":
            return decimal.Decimal(text)
        if kind == "bytes":
            return base64.b64decode(text, validate=True)
    except (ValueError, decimal.InvalidOperation) as exc:
        raise ProtocolError(f"malformed {kind} value: {exc}") from None
    raise ProtocolError(f"unknown tagged value kind {kind!r}")


# -- Arrow (host side only) -----------------------------------------------------------------------


def frame_to_arrow(payload: Any) -> pa.Table:
    """A worker's frame as an Arrow table (host side); :class:`ProtocolError` if malformed."""
    import pyarrow as pa

    df = decode_frame(payload)
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise TypeError(
            f"FINAL could not convert the DataFrame ({exc}); make each column one plain type"
        ) from None


def arrow_to_frame(table: pa.Table) -> dict[str, Any]:
    """An Arrow table as a frame for the worker (host side)."""
    return encode_frame(table.to_pandas())


def encode_arrow(table: pa.Table) -> str:
    """``table`` as a base64 Arrow IPC stream.

    >>> import pyarrow as pa
    >>> decode_arrow(encode_arrow(pa.table({"x": [1, 2]}))).to_pydict()
    {'x': [1, 2]}
    """
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def decode_arrow(data: str) -> pa.Table:
    """The table :func:`encode_arrow` encoded."""
    import pyarrow as pa

    with pa.ipc.open_stream(pa.py_buffer(base64.b64decode(data))) as reader:
        return reader.read_all()
