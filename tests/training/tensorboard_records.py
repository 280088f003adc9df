"""Reading TensorBoard event files back: TFRecord framing checked, events parsed with the
protocol buffers tensorboardX ships."""

import os
import struct

from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str) -> list[bytes]:
    """The records of one event file (uint64 length | uint32 masked crc32c(length) | data |
    uint32 masked crc32c(data)), each checksum checked."""
    with open(path, "rb") as f:
        data = f.read()
    records = []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        body = data[12 : 12 + length]
        assert struct.unpack("<I", data[8:12])[0] == _masked_crc(data[:8])
        assert struct.unpack("<I", data[12 + length : 16 + length])[0] == _masked_crc(body)
        records.append(body)
        data = data[16 + length :]
    return records


def scalars(directory: str) -> dict:
    """(tag, step) -> value of every scalar in a directory's event files."""
    found = {}
    for name in os.listdir(directory):
        for record in read_records(os.path.join(directory, name)):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                found[(value.tag, event.step)] = value.simple_value
    return found
