"""TensorBoard scalar event files, written without TensorBoard.

An event file is a sequence of TFRecords (a little-endian uint64 length, its masked CRC-32C, the
bytes, their masked CRC-32C), each holding one ``tensorflow.Event`` protocol buffer. Scalars need
four of its fields, encoded here by hand: ``wall_time`` (1, double), ``step`` (2, int64),
``file_version`` (3, string; the first record says "brain.Event:2") and ``summary`` (5), whose
repeated ``value`` (1) carries ``tag`` (1, string) and ``simple_value`` (2, float). TensorBoard
reads every file named ``events.out.tfevents.*`` under the directory it is pointed at.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def _table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64: negative values take ten bytes, as protobuf encodes them
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, *, file_version: str = "", tag: str = "", value: float = 0.0) -> bytes:
    body = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        body += _length_delimited(3, file_version.encode())
    if tag:
        summary_value = _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
        body += _length_delimited(5, _length_delimited(1, summary_value))
    return body


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


class EventFileWriter:
    """Appends scalars to a new event file under ``logdir`` (created if missing)."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.lepton"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")
        self._file.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        self._file.write(_record(_event(time.time() if wall_time is None else wall_time, step, tag=tag, value=value)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# --- reading (tests, and anyone without TensorBoard) ---------------------------------------------


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = _read_varint(data, at)
            yield number, wire_type, value
        elif wire_type == 1:
            yield number, wire_type, data[at : at + 8]
            at += 8
        elif wire_type == 5:
            yield number, wire_type, data[at : at + 4]
            at += 4
        elif wire_type == 2:
            size, at = _read_varint(data, at)
            yield number, wire_type, data[at : at + size]
            at += size
        else:
            raise ValueError(f"unsupported wire type {wire_type}")


def read_records(path: str | Path) -> Iterator[bytes]:
    """The records of an event file, each checked against its CRCs. Raises ValueError."""
    data = Path(path).read_bytes()
    at = 0
    while at < len(data):
        header = data[at : at + 12]
        (length,) = struct.unpack("<Q", header[:8])
        if struct.unpack("<I", header[8:12])[0] != _masked(crc32c(header[:8])):
            raise ValueError(f"bad length checksum at byte {at}")
        body = data[at + 12 : at + 12 + length]
        (crc,) = struct.unpack("<I", data[at + 12 + length : at + 16 + length])
        if crc != _masked(crc32c(body)):
            raise ValueError(f"bad data checksum at byte {at}")
        yield body
        at += 16 + length


def read_scalars(path: str | Path) -> list[tuple[str, int, float, float]]:
    """Every scalar of an event file as (tag, step, value, wall_time)."""
    out = []
    for record in read_records(path):
        wall_time, step, summary = 0.0, 0, b""
        for number, _, value in _fields(record):
            if number == 1:
                wall_time = struct.unpack("<d", value)[0]  # type: ignore[arg-type]
            elif number == 2:
                step = int(value)  # type: ignore[call-overload]
            elif number == 5:
                summary = value  # type: ignore[assignment]
        for _, _, summary_value in _fields(summary):
            tag, scalar = "", 0.0
            for number, _, value in _fields(summary_value):  # type: ignore[arg-type]
                if number == 1:
                    tag = value.decode()  # type: ignore[union-attr]
                elif number == 2:
                    scalar = struct.unpack("<f", value)[0]  # type: ignore[arg-type]
            out.append((tag, step, scalar, wall_time))
    return out
