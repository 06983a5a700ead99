"""Read an offline W&B run back, without network or a W&B server (a test helper).

``run-<id>.wandb`` in wandb 0.31, as checked on real files:

* a 7-byte header: ``b":W&B"``, the magic 0xBEE1 (uint16 LE) and a version byte (0);
* then 32 KiB blocks, the first counting the header; a record never straddles a block: a
  payload is split into FIRST/MIDDLE/LAST chunks, and a block tail shorter than a chunk
  header (7 bytes) is zero padding;
* each chunk: ``<crc32 uint32 LE, length uint16 LE, type uint8>`` + data, where the checksum is
  zlib's crc32 over the type byte then the data (LevelDB uses a masked crc32c; W&B does not);
* each payload: a ``wandb.proto.wandb_internal_pb2.Record``. History and summary items carry
  their key in ``nested_key`` (``["loss"]``, or ``["hist", "bins"]`` for a media field), not in
  ``key``; values are JSON in ``value_json``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_offline_run(path: str | Path) -> Path:
    """The newest ``offline-run-*/run-*.wandb`` under a run dir, its ``wandb/`` dir, or an offline-run dir."""
    path = Path(path)
    for pattern in ("run-*.wandb", "offline-run-*/run-*.wandb", "wandb/offline-run-*/run-*.wandb"):
        # the dir names start with a sortable timestamp (offline-run-YYYYmmdd_HHMMSS-<id>)
        files = sorted(path.glob(pattern), key=lambda p: (p.parent.name, p.stat().st_mtime))
        if files:
            return files[-1]
    raise FileNotFoundError(f"no offline W&B run (offline-run-*/run-*.wandb) under {path}")


def iter_payloads(data: bytes):
    """Reassembled record payloads of a ``.wandb`` file's bytes; stops at a truncated tail."""
    ident, magic, _version = HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"not a W&B transaction log (header {data[: HEADER.size]!r})")
    pos, pending = HEADER.size, None
    while pos + CHUNK.size <= len(data):
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < CHUNK.size:  # block trailer
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        body = data[pos + CHUNK.size : pos + CHUNK.size + length]
        if kind == 0 and length == 0:  # zero fill up to the block's end
            pos += left
            continue
        if len(body) < length:
            return  # the writer was cut off mid-record
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"checksum mismatch at byte {pos}")
        pos += CHUNK.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += body
            if kind == LAST:
                yield pending
                pending = None
        else:
            raise ValueError(f"unexpected chunk type {kind} at byte {pos}")


def _value(item: Any) -> Any:
    # wandb 0.31 writes value_json; HistoryItem also has a typed oneof ``value`` (none, boolean,
    # integer, number, text, json), read here in case a writer uses it.
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which in (None, "none"):
        return None
    raw = getattr(item, which)
    return json.loads(raw) if which == "json" else raw


def _assign(into: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        into = into.setdefault(key, {})
    into[keys[-1]] = _value(item)


def _finished_records(file: Path, pb: Any, timeout_s: float = 30.0) -> list[Any]:
    """The file's records once its ``exit`` record is there: ``run.finish()`` can return before W&B's
    service process has flushed the transaction log (seen: a file of only its 7-byte header)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for payload in iter_payloads(file.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def read_offline_run(path: str | Path) -> dict:
    """What an offline run recorded: ``run_id``, ``config``, ``history`` (one dict per logged row,
    media as nested dicts), ``summary``, ``alerts`` (title, text, level), the run's ``project``/``name``/``group``/``tags``/
    ``notes``/``job_type``, and ``dir`` (the offline-run dir; media paths are under ``dir/files``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    file = find_offline_run(path)
    out: dict[str, Any] = {"dir": file.parent, "run_id": None, "config": {}, "history": [], "summary": {}, "alerts": []}
    for record in _finished_records(file, pb):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                run_id=run.run_id,
                project=run.project,
                name=run.display_name,
                group=run.run_group,
                job_type=run.job_type,
                notes=run.notes,
                tags=list(run.tags),
            )
            for item in run.config.update:
                _assign(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _assign(out["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _assign(row, item)
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _assign(out["summary"], item)
        elif kind == "alert":
            out["alerts"].append({"title": record.alert.title, "text": record.alert.text, "level": record.alert.level})
    return out
