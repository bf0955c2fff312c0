"""Read an offline W&B run file (``run-<id>.wandb``) back, with W&B's own protobuf records.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each ``crc32c (4) | length (2, LE) | type (1: full, 2: first, 3: middle,
4: last)`` followed by the chunk; a record's chunks concatenate into one ``wandb.proto`` Record.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, parts = [], HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        parts.append(chunk)
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            out.append(rec)
            parts = []
    return out


def read_run(path: Path) -> dict:
    """{run: RunRecord fields, config: {key: value}, history: [ {key: value} ], summary: {...},
    artifacts: [ArtifactRecord], exit_code}"""
    run, config, history, summary, artifacts, exit_code = {}, {}, [], {}, [], None
    for r in records(path):
        t = r.WhichOneof("record_type")
        if t == "run":
            run = {"id": r.run.run_id, "group": r.run.run_group, "job_type": r.run.job_type,
                   "project": r.run.project, "name": r.run.display_name}
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif t == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif t == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif t == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
        elif t == "artifact":
            artifacts.append(r.artifact)
        elif t == "exit":
            exit_code = r.exit.exit_code
    return {"run": run, "config": config, "history": history, "summary": summary, "artifacts": artifacts,
            "exit_code": exit_code}
