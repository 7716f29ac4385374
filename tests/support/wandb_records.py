"""Reading an offline W&B run back without a server, for tests: the `.wandb` record log, parsed.

wandb 0.31 offers no reader of its own for offline runs, so the tests parse the LevelDB-style log the
SDK writes and compare what was logged with the parquet files it came from.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7  # ident ":W&B" (4), magic 0xBEE1 (2), version (1); record headers are 7 bytes too
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """The protobuf records of a `.wandb` file (LevelDB log format, W&B's 7-byte file header).

    Blocks are 32 KiB counted from the start of the file; a record is crc32 (seeded with its type
    byte), length, type and data, and long records are split FIRST/MIDDLE.../LAST across blocks.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path}: not a W&B record log")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # zero trailer at the end of a block
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding: no more records in this block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += _HEADER + length
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _item_value(item: Any) -> Any:
    """A history item's value: W&B writes either `value_json` or one typed field."""
    if item.value_json:
        return json.loads(item.value_json)
    field = item.WhichOneof("value")
    if field == "json":
        return json.loads(item.json)
    return getattr(item, field) if field and field != "none" else None


def _put(target: dict, item: Any, value: Any) -> None:
    """Store an item under its key; a nested key (one path element per level) makes nested dicts."""
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """An offline run folder's contents: config, summary, history steps, artifacts, id, group, job type, tags.

    Summary updates are merged in order (later wins, removals drop keys); each history record is one
    step as a dict; artifacts are {name, type, digest, use_after_commit, files} with the files in the
    artifact's manifest (use_after_commit: the run declares it as an input, W&B's offline use_artifact).
    """
    files = sorted(Path(run_dir).glob("*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_dir}: expected one .wandb file, found {len(files)}")
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "artifacts": [], "group": None,
                           "job_type": None, "id": None, "tags": [], "resume": None}
    for rec in iter_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["job_type"], run["id"] = rec.run.run_group, rec.run.job_type, rec.run.run_id
            run["tags"], run["resume"] = list(rec.run.tags), rec.run.resume
            for i in rec.run.config.update:
                _put(run["config"], i, json.loads(i.value_json))
        elif kind == "config":
            for i in rec.config.update:
                _put(run["config"], i, json.loads(i.value_json))
        elif kind == "summary":
            for i in rec.summary.update:
                _put(run["summary"], i, json.loads(i.value_json))
            for i in rec.summary.remove:
                run["summary"].pop(i.key, None)
        elif kind == "history":
            step: dict[str, Any] = {}
            for i in rec.history.item:
                _put(step, i, _item_value(i))
            run["history"].append(step)
        elif kind == "artifact":
            a = rec.artifact
            run["artifacts"].append({"name": a.name, "type": a.type, "digest": a.digest,
                                     "use_after_commit": a.use_after_commit,
                                     "files": [e.path for e in a.manifest.contents]})
    return run




def chart(run_dir: str | Path, run: dict[str, Any], key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `wandb.plot` chart logged under `key`: (its panel config, as W&B keeps it under
    _wandb.visualize.<key> in the run config; its table's JSON, from the table file the summary names)."""
    panel = run["config"]["_wandb"]["visualize"][key]
    table_key = panel["panel_config"]["userQuery"]["queryFields"][0]["fields"][3]["args"][0]["value"]
    entry = run["summary"][table_key]
    return panel, json.loads((Path(run_dir) / "files" / entry["path"]).read_text())
