# Recovery: read a journal directory back, tell torn tails from corruption, repair what a crash
# left (included by _journal.pyx).
#
# Owns: docs/FORMAT.md "Reading a journal". Must not: append records or touch group-commit
# state; it returns a _RecoveredState that Journal adopts.
#
# Invariants:
# - Nothing on disk changes until the whole journal has been read and found sound: a journal
#   that raises JournalCorruption is left exactly as it was.
# - A failure is a torn tail only where no later frame claims it durable; otherwise, or where a
#   crash cannot explain it (a non-last segment, a header, a missing segment), it is corruption.
# - Repairs (zeroing a torn tail, sealing a segment left unsealed by a crash during a roll) are
#   fsynced before the journal appends anything, so a crash during recovery just repeats it.


class _RecoveredState:
    __slots__ = ("journal_id", "floor", "segments", "salt", "end_offset", "next_seq", "skips",
                 "salvaged")


cdef class _Mapped:
    """A read-only map of a whole file (an empty view for an empty file)."""
    cdef object file, map
    cdef readonly object view

    def __cinit__(self, str path):
        self.file = open(path, "rb")
        size = os.fstat(self.file.fileno()).st_size
        if size:
            self.map = mmap.mmap(self.file.fileno(), size, access=mmap.ACCESS_READ)
            self.view = memoryview(self.map)
        else:
            self.map = None
            self.view = memoryview(b"")

    def close(self):
        self.view.release()
        if self.map is not None:
            self.map.close()    # before any rename or unlink: Windows refuses them on mapped files
        self.file.close()


def _segment_has_frames(const unsigned char[::1] view, uint64_t salt, int64_t base,
                        size_t max_frame):
    """Does a segment hold any frame that verifies (at its start, or anywhere after)?"""
    cdef FrameInfo info
    cdef FrameStatus status
    if view.shape[0] <= SEGMENT_HEADER:
        return False
    status = _check_frame(&view[0], SEGMENT_HEADER, view.shape[0], salt, base, max_frame, &info)
    if status == FRAME_OK:
        return True
    return _forward_scan(view, SEGMENT_HEADER - 8, salt, base, max_frame)[0] >= 0


def _recover(str directory, size_t max_frame, bint salvage):
    """Read the journal in `directory`; None when it has no segment yet."""
    if _remove_temporaries(directory):
        _fsync_directory(directory)
    segments = _list_segments(directory)
    if not segments:
        return None
    headers = []
    chain_start = 0     # segments before a break in the prev_base chain must lie below the floor
    for base, path in segments:
        with open(path, "rb") as f:
            header = _parse_segment_header(f.read(SEGMENT_HEADER), path)
        if header.base != base:
            raise JournalCorruption(
                f"segment header says base {header.base}, its name says {base}", path, 40)
        if headers and header.journal_id != headers[0].journal_id:
            raise JournalCorruption(
                "segment belongs to another journal (journal_id differs)", path, 16)
        if headers and header.prev_base != segments[len(headers) - 1][0]:
            chain_start = len(headers)
        headers.append(header)
    # Segments before the last break were released (their unlink undone by a crash) if the
    # floor proves it; otherwise a segment is missing. Only the unbroken chain is read.
    resurrected = segments[:chain_start]
    segments = segments[chain_start:]
    headers = headers[chain_start:]

    floor = max(max(h.floor for h in headers), 1)
    skips = {}
    salvaged = []
    repairs = []
    cdef int64_t expected = segments[0][0]
    cdef Py_ssize_t off, end_offset = SEGMENT_HEADER
    cdef _SegmentScan scan
    last_index = len(segments) - 1
    for index, (base, path) in enumerate(segments):
        header = headers[index]
        is_last = index == last_index
        next_base = None if is_last else segments[index + 1][0]
        if base != expected:
            raise JournalCorruption(
                f"segment starts at seq {base}, but the previous one ends before {expected}",
                path, 40)
        mapped = _Mapped(path)
        try:
            view = mapped.view
            off = SEGMENT_HEADER
            seal = None
            while True:
                scan = _scan_segment(view, off, header.salt, expected, max_frame)
                for coff, ctype, value in scan.controls:
                    if ctype == REC_LOWWATER:
                        floor = max(floor, value)
                    elif ctype == REC_SEAL:
                        seal = (coff, value)
                expected = scan.next_seq
                off = scan.end_offset
                if seal is not None:
                    break
                if is_last:
                    cand_off, cand_seq, cand_claim = _forward_scan(
                        view, off, header.salt, expected, max_frame)
                    if cand_claim < expected:
                        # Torn tail: never acknowledged. Zero it so a stale frame after it can
                        # never be read as the successor of a frame we write over it.
                        stop = _last_nonzero(view, off)
                        if stop > off:
                            repairs.append(("zero", path, off, stop))
                            log.debug("journal %s: cut a torn tail at %s offset %d (%s)",
                                      directory, path, off, _FRAME_STATUS_TEXT[scan.end_status])
                        end_offset = off
                        break
                else:
                    cand_off, cand_seq, cand_claim = _forward_scan(
                        view, off, header.salt, expected, max_frame)
                    if cand_off < 0 and expected == next_base:
                        # A crash during a roll: the successor was published, the SEAL not yet
                        # written. Acceptable only while the successor holds no frame.
                        nxt = _Mapped(segments[index + 1][1])
                        try:
                            successor_used = _segment_has_frames(
                                nxt.view, headers[index + 1].salt, next_base, max_frame)
                        finally:
                            nxt.close()
                        if not successor_used:
                            stop = _last_nonzero(view, off)
                            repairs.append(("seal", path, off, max(stop, off), next_base,
                                            header.salt, expected - 1))
                            seal = (off, next_base)
                            break
                # Damage a crash cannot explain.
                reason = _FRAME_STATUS_TEXT[scan.end_status]
                if not salvage:
                    where = ("a later frame claims it was durable" if is_last
                             else "not the last segment")
                    raise JournalCorruption(
                        f"damaged frame at seq {expected} ({reason}; {where})", path, off)
                if cand_off >= 0:
                    salvaged.append((path, off, expected, cand_seq - 1))
                    skips.setdefault(path, {})[off] = (cand_off, cand_seq)
                    log.error("journal %s: salvage skipped seqs %d..%d at %s offset %d (%s)",
                              directory, expected, cand_seq - 1, path, off, reason)
                    off = cand_off
                    expected = cand_seq
                    continue
                lost_to = (next_base - 1) if next_base is not None else expected - 1
                salvaged.append((path, off, expected, lost_to))
                skips.setdefault(path, {})[off] = (-1, lost_to + 1)
                log.error("journal %s: salvage skipped seqs %d..%d at %s offset %d (%s)",
                          directory, expected, lost_to, path, off, reason)
                expected = lost_to + 1
                end_offset = off
                break
            if seal is not None:
                if is_last:
                    raise JournalCorruption(
                        f"segment is sealed, but the segment it names ({seal[1]}) is missing",
                        path, seal[0])
                if seal[1] != next_base or expected != next_base:
                    raise JournalCorruption(
                        f"segment ends before seq {expected} and names {seal[1]} as next, but "
                        f"the next segment starts at {next_base}", path, seal[0])
        finally:
            mapped.close()

    if resurrected and floor < segments[0][0]:
        raise JournalCorruption(
            f"segment follows {headers[0].prev_base}, but the segment before it is "
            f"{resurrected[-1][0]} (a segment is missing)", segments[0][1], 48)
    if segments[0][0] > floor and segments[0][0] != 1:
        raise JournalCorruption(
            f"segments before seq {segments[0][0]} are missing (the journal's floor is {floor})",
            segments[0][1], 0)

    _apply_repairs(repairs)
    # Segments wholly below the floor were released before a crash undid their unlink.
    kept = []
    removed = False
    for base, path in resurrected:
        os.unlink(path)
        removed = True
    for index, (base, path) in enumerate(segments):
        if index < last_index and segments[index + 1][0] <= floor:
            os.unlink(path)
            removed = True
        else:
            kept.append((base, path))
    if removed:
        _fsync_directory(directory)

    state = _RecoveredState()
    state.journal_id = headers[0].journal_id
    state.floor = floor
    state.segments = kept
    state.salt = headers[-1].salt
    state.end_offset = end_offset
    state.next_seq = expected
    state.skips = skips
    state.salvaged = salvaged
    return state


def _apply_repairs(list repairs):
    for repair in repairs:
        path = repair[1]
        fd = os.open(path, os.O_RDWR | _O_BINARY)
        try:
            start, stop = repair[2], repair[3]
            while start < stop:
                chunk = min(len(_ZERO_CHUNK), stop - start)
                _pwrite_all(fd, _ZERO_CHUNK[:chunk], start)
                start += chunk
            if repair[0] == "seal":
                _, _, off, _, next_base, salt, claim = repair
                seal = _build_control_frame(REC_SEAL, next_base, next_base, claim, salt)
                _pwrite_all(fd, seal, off)
            os.fsync(fd)
        finally:
            os.close(fd)
