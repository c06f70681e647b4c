"""A small, independent, pure-Python reader of the journal's on-disk format (docs/FORMAT.md).

Owns: parsing segment headers and frames, and the recovery classification of "Reading a
journal" (what is a clean end, what is a torn tail, what is corruption). Tests use it to check
what ``pmq._journal`` writes; ``pmq journal dump`` and ``verify`` will use it to show a journal.

Must not: write, rename or delete anything, or import ``pmq._journal``. It is the second,
independent reading of docs/FORMAT.md, so it shares no code with the writer. It is a reference,
not a fast path: it reads whole files into memory and favours plain checks over speed.

Invariants:
- Every check below is written in FORMAT.md; where this module and FORMAT.md disagree, FORMAT.md
  is right.
- A journal is either read completely (a ``JournalReport``) or rejected with
  ``JournalCorruption`` naming the file and the byte offset where the damage starts.
- Nothing below the floor is ever returned as a record.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
from typing import NamedTuple

import xxhash

from pmq.errors import JournalCorruption

__all__ = [
    "CLOSE",
    "DATA",
    "FLAG_CONTROL",
    "FORMAT_VERSION",
    "FRAME_ALIGN_BYTES",
    "FRAME_HEADER_BYTES",
    "FRAME_VERSION",
    "LOWWATER",
    "MAGIC",
    "MIN_FRAME_BYTES",
    "RECORD_HEADER_BYTES",
    "SEAL",
    "SEGMENT_HEADER_BYTES",
    "Frame",
    "JournalReport",
    "Record",
    "SegmentHeader",
    "SegmentScan",
    "parse_segment_header",
    "read_journal",
    "scan_segment",
]

MAGIC = b"PMQJRNL\0"
FORMAT_VERSION = 1
FRAME_VERSION = 1
SEGMENT_HEADER_BYTES = 4096
SEGMENT_HEADER_USED_BYTES = 80
FRAME_HEADER_BYTES = 32
RECORD_HEADER_BYTES = 8
MIN_FRAME_BYTES = FRAME_HEADER_BYTES + RECORD_HEADER_BYTES
FRAME_ALIGN_BYTES = 8
FLAG_CONTROL = 1
DATA, SEAL, LOWWATER, CLOSE = 1, 2, 3, 4
CONTROL_PAYLOAD_BYTES = {SEAL: 8, LOWWATER: 8, CLOSE: 0}

SEGMENT_NAME = re.compile(r"^[0-9]{20}\.seg$")
_HEADER = struct.Struct("<8sHHI16sQQQQQQ")  # bytes 0..79 of a segment
_FRAME = struct.Struct("<QIHBBQQ")  # the 32-byte frame header
_RECORD = struct.Struct("<IBBH")  # the 8-byte record header
_U64 = struct.Struct("<Q")


class SegmentHeader(NamedTuple):
    """The fields of a segment's 4096-byte header (FORMAT.md "Segment header")."""

    version: int
    header_len: int
    flags: int
    journal_id: bytes
    salt: int
    base_seq: int
    prev_base: int
    floor: int
    created_ns: int
    checksum: int


class Record(NamedTuple):
    """One record of a frame: its type (DATA, SEAL, LOWWATER, CLOSE) and payload."""

    type: int
    payload: bytes


class Frame(NamedTuple):
    """One frame that verified: where it lies, its header fields and its records."""

    offset: int
    frame_len: int
    flags: int
    first_seq: int
    durable_seq: int
    records: tuple[Record, ...]

    @property
    def control(self) -> bool:
        """Whether this is a control frame (its records take no seq)."""
        return bool(self.flags & FLAG_CONTROL)

    @property
    def end(self) -> int:
        """The offset of the next frame: the end of this one, padded to 8 bytes."""
        return _align(self.offset + self.frame_len)


class SegmentScan(NamedTuple):
    """What one segment file holds, read from its header to the end of its valid frames.

    ``end_offset`` is where valid data stops; ``end_reason`` says why: ``"seal"`` (it ended with
    a SEAL), ``"zero"`` (a 32-byte all-zero frame header), ``"eof"`` (the end of the file) or
    the reason the frame at ``end_offset`` failed. ``next_seq`` is the seq expected after the
    last valid frame, ``claim`` the highest ``durable_seq`` of its frames (0 if none) and
    ``seal_next_base`` the base its SEAL names (None if it is not sealed).
    """

    path: str
    header: SegmentHeader
    frames: tuple[Frame, ...]
    end_offset: int
    end_reason: str
    next_seq: int
    claim: int
    seal_next_base: int | None


class JournalReport(NamedTuple):
    """A journal read the way recovery reads it (FORMAT.md "Reading a journal").

    ``records`` holds ``(seq, payload)`` for every data record at or above ``floor``, in order;
    ``next_seq`` is the seq the next append would get. ``tail`` is ``"clean"`` (only zeros or
    nothing after the last valid frame) or ``"torn"`` (other bytes there, which recovery cuts
    off), at ``tail_offset`` of ``tail_path``. ``obsolete`` lists segments wholly below the
    floor (recovery deletes them again); they are not part of ``segments``.
    """

    directory: str
    journal_id: bytes
    floor: int
    next_seq: int
    records: tuple[tuple[int, bytes], ...]
    segments: tuple[SegmentScan, ...]
    obsolete: tuple[str, ...]
    tail: str
    tail_path: str
    tail_offset: int


def _align(offset: int) -> int:
    return (offset + FRAME_ALIGN_BYTES - 1) // FRAME_ALIGN_BYTES * FRAME_ALIGN_BYTES


def parse_segment_header(data: bytes, path: str) -> SegmentHeader:
    """Parse and check the header at the start of a segment file.

    Args:
        data: the segment file's bytes (at least its first 4096).
        path: the file's path, for the error.

    Returns:
        The header's fields.

    Raises:
        JournalCorruption: the file is shorter than a header, or its magic, version,
            header_len, flags or header checksum is wrong.
    """
    if len(data) < SEGMENT_HEADER_BYTES:
        raise JournalCorruption(f"segment is {len(data)} bytes, shorter than its header", path, 0)
    magic, *fields = _HEADER.unpack_from(data, 0)
    header = SegmentHeader(*fields)
    if magic != MAGIC:
        raise JournalCorruption(f"bad magic {magic!r}", path, 0)
    expected = xxhash.xxh3_64_intdigest(data[: _HEADER.size - 8], 0)
    if header.checksum != expected:
        raise JournalCorruption("segment header checksum mismatch", path, _HEADER.size - 8)
    if header.version != FORMAT_VERSION:
        raise JournalCorruption(f"unknown format version {header.version}", path, 8)
    if header.header_len != SEGMENT_HEADER_BYTES:
        raise JournalCorruption(f"header_len is {header.header_len}, not 4096", path, 10)
    if header.flags != 0:
        raise JournalCorruption(f"unknown segment flags {header.flags:#x}", path, 12)
    return header


def _read_frame(data: bytes, offset: int, salt: int, expected_seq: int) -> Frame | str:
    """Return the frame at ``offset`` if it verifies, else the reason it fails."""
    if offset >= len(data):
        return "eof"
    raw_header = data[offset : offset + FRAME_HEADER_BYTES]
    if raw_header.count(0) == len(raw_header):
        return "zero"
    if len(raw_header) < FRAME_HEADER_BYTES:
        return "frame header cut by the end of the file"
    checksum, frame_len, count, version, flags, first_seq, durable_seq = _FRAME.unpack(raw_header)
    if frame_len < MIN_FRAME_BYTES:
        return f"frame_len {frame_len} is below {MIN_FRAME_BYTES}"
    if offset + frame_len > len(data):
        return f"frame_len {frame_len} runs past the end of the file"
    if xxhash.xxh3_64_intdigest(data[offset + 8 : offset + frame_len], salt) != checksum:
        return "frame checksum mismatch"
    if version != FRAME_VERSION or flags & ~FLAG_CONTROL or count == 0:
        return f"bad frame_version {version}, flags {flags:#x} or record_count {count}"
    if first_seq != expected_seq:
        return f"first_seq is {first_seq}, expected {expected_seq}"
    records: list[Record] = []
    position, end = offset + FRAME_HEADER_BYTES, offset + frame_len
    while position < end and len(records) < count:
        if position + RECORD_HEADER_BYTES > end:
            return "record header cut by the end of the frame"
        payload_len, kind, record_flags, reserved = _RECORD.unpack_from(data, position)
        position += RECORD_HEADER_BYTES
        if position + payload_len > end:
            return "record payload runs past the end of the frame"
        if record_flags or reserved:
            return "record flags or reserved bytes are not zero"
        if flags & FLAG_CONTROL:
            if CONTROL_PAYLOAD_BYTES.get(kind) != payload_len:
                return f"control record of type {kind} with a {payload_len}-byte payload"
        elif kind != DATA:
            return f"record of type {kind} in a data frame"
        records.append(Record(kind, data[position : position + payload_len]))
        position += payload_len
    if position != end or len(records) != count:
        return "records do not fill the frame exactly"
    for record in records:
        if record.type == SEAL and _U64.unpack(record.payload)[0] != first_seq:
            return "SEAL names a base other than the next seq"
    return Frame(offset, frame_len, flags, first_seq, durable_seq, tuple(records))


def scan_segment(data: bytes, path: str, expected_seq: int | None = None) -> SegmentScan:
    """Read a segment's header, then its frames from byte 4096 until its end.

    The end is the first 32-byte all-zero frame header, the end of the file, a frame that
    fails (bounds, checksum, structure or ``first_seq`` continuity), or the frame after a SEAL.
    A failing frame is not an error here: ``read_journal`` decides what it means.

    Args:
        data: the whole segment file.
        path: the file's path, for errors and the result.
        expected_seq: the seq the first frame must start at; the header's ``base_seq`` if None.

    Returns:
        The header, the frames that verified and where and why they stop.

    Raises:
        JournalCorruption: the header is bad (see ``parse_segment_header``).
    """
    header = parse_segment_header(data, path)
    expected = header.base_seq if expected_seq is None else expected_seq
    frames: list[Frame] = []
    offset, claim, seal_next_base = SEGMENT_HEADER_BYTES, 0, None
    while True:
        frame = _read_frame(data, offset, header.salt, expected)
        if isinstance(frame, str):
            reason = frame
            break
        frames.append(frame)
        claim = max(claim, frame.durable_seq)
        offset = frame.end
        if not frame.control:
            expected += len(frame.records)
        elif any(record.type == SEAL for record in frame.records):
            seal_next_base, reason = frame.first_seq, "seal"
            break
    return SegmentScan(path, header, tuple(frames), offset, reason, expected, claim, seal_next_base)


def _claim_after(data: bytes, start: int, salt: int, expected_seq: int) -> int:
    """Scan forward from ``start`` in 8-byte steps for frames that verify under ``salt`` with
    ``first_seq >= expected_seq``; return the highest ``durable_seq`` they claim (-1 if none)."""
    claim = -1
    for offset in range(start, len(data) - FRAME_HEADER_BYTES + 1, FRAME_ALIGN_BYTES):
        checksum, frame_len, _, _, _, first_seq, durable_seq = _FRAME.unpack_from(data, offset)
        plausible = MIN_FRAME_BYTES <= frame_len <= len(data) - offset
        if (
            plausible
            and first_seq >= expected_seq
            and durable_seq > claim
            and xxhash.xxh3_64_intdigest(data[offset + 8 : offset + frame_len], salt) == checksum
        ):
            claim = durable_seq
    return claim


def _segment_files(directory: str) -> list[tuple[int, str]]:
    names = sorted(name for name in os.listdir(directory) if SEGMENT_NAME.match(name))
    return [(int(name[:-4]), os.path.join(directory, name)) for name in names]


def read_journal(directory: str | os.PathLike[str]) -> JournalReport:
    """Read a journal directory exactly as recovery must (FORMAT.md "Reading a journal").

    ``LOCK``, ``*.tmp`` and any other file not named like a segment are ignored. Nothing on disk
    is changed.

    Args:
        directory: the journal directory.

    Returns:
        The records at or above the floor, in order, and how the journal ends.

    Raises:
        JournalCorruption: a bad or foreign segment header, a missing segment, a non-last
            segment that does not end with a SEAL naming its successor (outside the roll-crash
            exception), a sealed last segment, or a damaged frame that a later frame claims
            was durable. ``path`` and ``offset`` name where the damage starts.
        OSError: the directory or a file cannot be read.
    """
    directory = os.fspath(directory)
    scans: list[SegmentScan] = []
    for base, path in _segment_files(directory):
        with open(path, "rb") as file:
            data = file.read()
        header = parse_segment_header(data, path)
        if header.base_seq != base:
            raise JournalCorruption(f"base_seq {header.base_seq} differs from the name", path, 40)
        if scans and header.journal_id != scans[0].header.journal_id:
            raise JournalCorruption("segment belongs to another journal (journal_id)", path, 16)
        scans.append(scan_segment(data, path))
    if not scans:
        return JournalReport(directory, b"", 1, 1, (), (), (), "clean", "", 0)
    # Step 5 first: segments wholly below the floor are obsolete (an unlink a crash undid).
    floor = max(1, *(scan.header.floor for scan in scans))
    for scan in scans:
        for frame in scan.frames:
            for record in frame.records:
                if record.type == LOWWATER:
                    floor = max(floor, _U64.unpack(record.payload)[0])
    obsolete = 0
    while obsolete + 1 < len(scans) and scans[obsolete + 1].header.base_seq <= floor:
        obsolete += 1
    live = scans[obsolete:]
    first = live[0]
    if first.header.base_seq > floor:
        raise JournalCorruption(
            f"the journal starts at seq {first.header.base_seq}, but its floor is {floor}: "
            "a segment is missing",
            first.path,
            40,
        )
    # Steps 1, 3 and 4: the chain of segments.
    for older, newer in itertools.pairwise(live):
        if newer.header.prev_base != older.header.base_seq:
            raise JournalCorruption(
                f"prev_base {newer.header.prev_base} does not name the previous segment "
                f"{older.header.base_seq}: a segment is missing",
                newer.path,
                48,
            )
        if older.seal_next_base is not None:
            if older.seal_next_base != newer.header.base_seq:
                raise JournalCorruption(
                    f"SEAL names {older.seal_next_base}, but the next segment is "
                    f"{newer.header.base_seq}",
                    older.path,
                    older.frames[-1].offset,
                )
            continue
        crash_during_roll = (
            newer is live[-1] and not newer.frames and older.next_seq == newer.header.base_seq
        )
        if not crash_during_roll:
            raise JournalCorruption(
                f"segment does not end with a SEAL ({older.end_reason})",
                older.path,
                older.end_offset,
            )
    last = live[-1]
    if last.seal_next_base is not None:
        raise JournalCorruption(
            f"the last segment is sealed, but segment {last.seal_next_base} is missing",
            last.path,
            last.frames[-1].offset,
        )
    # Step 3, last segment: is its end a torn tail, or damage that some frame (read so far, or
    # found verifying past the end) proves was durable? `data` still holds the last segment.
    claim = max(
        *(scan.claim for scan in live),
        _claim_after(data, last.end_offset, last.header.salt, last.next_seq),
    )
    if claim >= last.next_seq:
        raise JournalCorruption(
            f"the log ends before seq {last.next_seq} ({last.end_reason}), but a frame claims "
            f"seq {claim} durable",
            last.path,
            last.end_offset,
        )
    rest = data[last.end_offset :]
    tail = "clean" if rest.count(0) == len(rest) else "torn"
    records = tuple(
        (seq, record.payload)
        for scan in live
        for frame in scan.frames
        if not frame.control
        for seq, record in enumerate(frame.records, frame.first_seq)
        if seq >= floor
    )
    return JournalReport(
        directory,
        first.header.journal_id,
        floor,
        last.next_seq,
        records,
        tuple(live),
        tuple(scan.path for scan in scans[:obsolete]),
        tail,
        last.path,
        last.end_offset,
    )
