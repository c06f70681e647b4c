"""The store's checkpoint file: a durable snapshot of queue state up to a journal seq.

Owns: the checkpoint file's bytes and its crash-safe replacement. Must not: decide what goes
in it (the store does) or read the journal.

Invariants:
- The file is replaced only by write-to-temporary, fsync, rename, fsync of the directory, so a
  crash leaves either the old checkpoint or the new one, never a mix.
- A damaged checkpoint is refused with JournalCorruption, never half-loaded: the records it
  summarised may already be gone from the journal.

Layout: ``b"PMQCKPT1"``, a u64 XXH3-64 of the body, then the body (msgpack).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

import msgpack
import xxhash

from pmq.errors import JournalCorruption

MAGIC = b"PMQCKPT1"
_HEADER = struct.Struct("<8sQ")
FILENAME = "checkpoint"


def write_checkpoint(directory: str, state: dict[str, Any]) -> None:
    """Replace ``directory/checkpoint`` with `state`, durably."""
    body = msgpack.packb(state, use_bin_type=True)
    data = _HEADER.pack(MAGIC, xxhash.xxh3_64_intdigest(body)) + body
    path = os.path.join(directory, FILENAME)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)  # the new contents are durable before their name can replace the old file
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_directory(directory)  # the rename itself survives a power cut


def read_checkpoint(directory: str) -> dict[str, Any] | None:
    """The last checkpoint written in `directory`, or None if there is none."""
    path = os.path.join(directory, FILENAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER.size:
        raise JournalCorruption("checkpoint is truncated", path, 0)
    magic, checksum = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise JournalCorruption("not a pmq checkpoint (bad magic)", path, 0)
    body = data[_HEADER.size :]
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise JournalCorruption("checkpoint checksum mismatch", path, _HEADER.size)
    state = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(state, dict):
        raise JournalCorruption("checkpoint body is not a map", path, _HEADER.size)
    return state


def _fsync_directory(directory: str) -> None:
    if sys.platform == "win32":
        return  # NTFS journals renames; a directory cannot be opened for fsync
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
