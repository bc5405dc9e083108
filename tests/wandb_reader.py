"""Read the records of an offline W&B run file (``run-*.wandb``): a 7-byte header, then LevelDB-log records
(4-byte checksum, 2-byte length, 1-byte type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks, each payload a
``wandb_internal_pb2.Record``. Written here so the test checks what W&B would upload, not what we logged."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    position, pending = HEADER, b""
    while position + 7 <= len(data):
        block_left = BLOCK - position % BLOCK
        if block_left < 7:  # block trailer padding
            position += block_left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def complete_records(path: str | Path, timeout: float = 60.0) -> list:
    """The file's records once W&B's service process has written the run's ``exit`` record: ``run.finish()``
    can return before the service has flushed everything (seen on a heavily loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def summary(path: str | Path) -> dict:
    """The run's final summary as W&B would upload it (later updates override earlier ones)."""
    values = {}
    for record in complete_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                values[key] = json.loads(item.value_json)
    return values
