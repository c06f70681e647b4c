"""Types of the compiled journal (``pmq._journal``); see docs/FORMAT.md and docs/journal.md."""

import asyncio
import os
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple, Self

from typing_extensions import Buffer, disjoint_base

_Durability = Literal["always", "interval", "never"]
_Prealloc = Literal["zero", "allocate", "none"]
_OnCorruption = Literal["raise", "salvage"]

MAGIC: bytes
SEGMENT_HEADER_BYTES: int
FRAME_HEADER_BYTES: int
RECORD_HEADER_BYTES: int
DEFAULT_SEGMENT_BYTES: int
MIN_SEGMENT_BYTES: int
MAX_SEGMENT_BYTES: int
MARK_BYTES: int  # replay() remembers where a frame starts once per this many bytes

class SegmentInfo(NamedTuple):
    path: str
    base_seq: int
    end_seq: int
    size_bytes: int
    active: bool

class SalvagedRange(NamedTuple):
    path: str
    offset: int
    first_seq: int
    last_seq: int

@disjoint_base
class Journal:
    directory: str
    journal_id: bytes
    durability: _Durability
    prealloc: _Prealloc
    segment_bytes: int
    max_frame_bytes: int
    max_payload_bytes: int
    salvaged: list[SalvagedRange]
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = ...,
        durability: _Durability = "always",
        interval_ms: float = 50.0,
        prealloc: _Prealloc | None = None,
        max_frame_bytes: int | None = None,
        on_corruption: _OnCorruption = "raise",
    ) -> None: ...
    @property
    def next_seq(self) -> int: ...
    @property
    def written_seq(self) -> int: ...
    @property
    def durable_seq(self) -> int: ...
    @property
    def floor(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    def append(self, payload: Buffer) -> int: ...
    def append_many(self, payloads: Iterable[Buffer]) -> int: ...
    def sync(self, seq: int | None = None) -> None: ...
    def sync_async(self, seq: int | None = None) -> asyncio.Future[None]: ...
    def replay(
        self, start_seq: int = 1, stop_seq: int | None = None
    ) -> Iterator[tuple[int, bytes]]: ...
    def release_before(self, seq: int) -> int: ...
    def copy_forward(self, seqs: Iterable[int]) -> dict[int, int]: ...
    def segments(self) -> list[SegmentInfo]: ...
    def stats(self) -> dict[str, float]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...

def _set_fault(
    op: Literal["write", "sync", "prepare"], countdown: int, errno: int, short_bytes: int = 0
) -> None: ...
def _clear_faults() -> None: ...
