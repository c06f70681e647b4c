# Frame verification and segment scanning, shared by recovery and replay (included by _journal.pyx).
#
# Owns: deciding whether the bytes at an offset are a valid frame (docs/FORMAT.md "Frames") and
# walking a segment's frames. Must not: open, write or delete files, or take the journal's mutex.
# Every function here reads only the buffer it is given, so it runs without the GIL.

cdef enum FrameStatus:
    FRAME_OK = 0
    FRAME_ZERO = 1        # a 32-byte all-zero header: the normal end of data
    FRAME_SHORT = 2       # the file ends inside the header or the frame
    FRAME_BAD_LENGTH = 3  # frame_len out of bounds
    FRAME_BAD_CHECKSUM = 4
    FRAME_BAD_SEQ = 5     # verifies, but first_seq is not the expected one
    FRAME_BAD_RECORDS = 6  # verifies, but its records do not add up (a writer bug or a collision)

_FRAME_STATUS_TEXT = {
    FRAME_OK: "ok",
    FRAME_ZERO: "zero-filled header",
    FRAME_SHORT: "file ends inside a frame",
    FRAME_BAD_LENGTH: "frame length out of bounds",
    FRAME_BAD_CHECKSUM: "checksum mismatch",
    FRAME_BAD_SEQ: "sequence number out of order",
    FRAME_BAD_RECORDS: "records do not fill the frame",
}

cdef struct FrameInfo:
    Py_ssize_t offset
    uint32_t frame_len
    uint16_t count
    uint8_t flags
    int64_t first_seq
    int64_t claim


cdef inline Py_ssize_t _align8(Py_ssize_t n) noexcept nogil:
    return (n + 7) & ~(<Py_ssize_t>7)


cdef uint64_t _frame_checksum(const unsigned char* frame, size_t frame_len,
                              uint64_t salt) noexcept nogil:
    return XXH3_64bits_withSeed(frame + 8, frame_len - 8, salt)


cdef FrameStatus _check_frame(const unsigned char* buf, Py_ssize_t off, Py_ssize_t end,
                              uint64_t salt, int64_t expected, size_t max_frame,
                              FrameInfo* out) noexcept nogil:
    """Classify the bytes at buf[off:end] as a frame; fill `out` when they are one."""
    cdef const unsigned char* p = buf + off
    cdef Py_ssize_t i, roff, rlen
    cdef uint32_t flen
    cdef uint8_t rtype
    cdef uint16_t n
    if end - off < FRAME_HEADER:
        for i in range(end - off):
            if p[i] != 0:
                return FRAME_SHORT
        return FRAME_ZERO
    for i in range(FRAME_HEADER):
        if p[i] != 0:
            break
    else:
        return FRAME_ZERO
    flen = pmq_load_u32(p + 8)
    if flen < FRAME_HEADER + RECORD_HEADER or flen > max_frame:
        return FRAME_BAD_LENGTH
    if <Py_ssize_t>flen > end - off:
        return FRAME_SHORT
    if pmq_load_u64(p) != _frame_checksum(p, flen, salt):
        return FRAME_BAD_CHECKSUM
    out.offset = off
    out.frame_len = flen
    out.count = pmq_load_u16(p + 12)
    out.flags = p[15]
    out.first_seq = <int64_t>pmq_load_u64(p + 16)
    out.claim = <int64_t>pmq_load_u64(p + 24)
    if out.first_seq != expected:
        return FRAME_BAD_SEQ
    if p[14] != FRAME_VERSION or out.count == 0:
        return FRAME_BAD_RECORDS
    roff = FRAME_HEADER
    for n in range(out.count):
        if roff + RECORD_HEADER > flen:
            return FRAME_BAD_RECORDS
        rlen = pmq_load_u32(p + roff)
        rtype = p[roff + 4]
        if (out.flags & FLAG_CONTROL) != 0:
            if rtype != REC_SEAL and rtype != REC_LOWWATER and rtype != REC_CLOSE:
                return FRAME_BAD_RECORDS
        elif rtype != REC_DATA:
            return FRAME_BAD_RECORDS
        roff += RECORD_HEADER + rlen
    if roff != flen:
        return FRAME_BAD_RECORDS
    return FRAME_OK


cdef class _SegmentScan:
    """What one pass over a segment's frames found (recovery and `pmq journal verify` use it)."""
    cdef readonly Py_ssize_t end_offset     # offset of the first byte that is not a valid frame
    cdef readonly int end_status            # FrameStatus at end_offset (FRAME_ZERO: clean end)
    cdef readonly int64_t next_seq          # the seq the next frame would have to start with
    cdef readonly int64_t max_claim         # highest durable_seq claimed by a valid frame
    cdef readonly Py_ssize_t frames
    cdef readonly list controls             # [(offset, type, value)] of control records
    cdef readonly Py_ssize_t last_frame_offset
    cdef readonly int64_t bad_first_seq     # first_seq of a verified frame that was out of order


cdef _SegmentScan _scan_segment(const unsigned char[::1] buf, Py_ssize_t start,
                                uint64_t salt, int64_t expected, size_t max_frame):
    """Walk frames from `start` until the first one that is not valid."""
    cdef _SegmentScan scan = _SegmentScan.__new__(_SegmentScan)
    cdef Py_ssize_t end = buf.shape[0]
    cdef Py_ssize_t off = start
    cdef FrameInfo info
    cdef FrameStatus status = FRAME_ZERO
    cdef const unsigned char* base = &buf[0] if end > 0 else NULL
    cdef const unsigned char* rec
    cdef Py_ssize_t roff
    cdef int i
    scan.controls = []
    scan.max_claim = 0
    scan.frames = 0
    scan.last_frame_offset = -1
    scan.bad_first_seq = -1
    while True:
        with nogil:
            while True:
                status = _check_frame(base, off, end, salt, expected, max_frame, &info)
                if status != FRAME_OK:
                    break
                scan.frames += 1
                scan.last_frame_offset = off
                if info.claim > scan.max_claim:
                    scan.max_claim = info.claim
                if (info.flags & FLAG_CONTROL) != 0:
                    break            # handled with the GIL below
                expected += info.count
                off += _align8(info.frame_len)
        if status != FRAME_OK:
            break
        roff = FRAME_HEADER
        rec = base + off
        for i in range(info.count):
            scan.controls.append((off, rec[roff + 4], _control_value(rec + roff)))
            roff += RECORD_HEADER + pmq_load_u32(rec + roff)
        off += _align8(info.frame_len)
    if status == FRAME_BAD_SEQ:
        scan.bad_first_seq = info.first_seq
    scan.end_offset = off
    scan.end_status = status
    scan.next_seq = expected
    return scan


cdef int64_t _control_value(const unsigned char* record) noexcept nogil:
    if pmq_load_u32(record) >= 8:
        return <int64_t>pmq_load_u64(record + RECORD_HEADER)
    return 0


cdef tuple _forward_scan(const unsigned char[::1] buf, Py_ssize_t start, uint64_t salt,
                         int64_t min_seq, size_t max_frame):
    """Look past a failure for frames that still verify: (first offset, its seq, highest claim).

    A later frame that claims a seq at or past the failure as durable proves the failure is
    corruption, not a torn write (docs/FORMAT.md "Reading a journal", step 3).
    """
    cdef Py_ssize_t end = buf.shape[0]
    cdef Py_ssize_t off = _align8(start + 1)
    cdef Py_ssize_t found_off = -1
    cdef int64_t found_seq = -1
    cdef int64_t claim = -1
    cdef const unsigned char* base = &buf[0] if end > 0 else NULL
    cdef const unsigned char* p
    cdef uint32_t flen
    cdef int64_t first
    with nogil:
        while off + FRAME_HEADER <= end:
            p = base + off
            flen = pmq_load_u32(p + 8)
            if (flen >= FRAME_HEADER + RECORD_HEADER and flen <= max_frame
                    and off + <Py_ssize_t>flen <= end):
                first = <int64_t>pmq_load_u64(p + 16)
                if first >= min_seq and pmq_load_u64(p) == _frame_checksum(p, flen, salt):
                    if found_off < 0:
                        found_off = off
                        found_seq = first
                    if <int64_t>pmq_load_u64(p + 24) > claim:
                        claim = <int64_t>pmq_load_u64(p + 24)
            off += 8
    return found_off, found_seq, claim


cdef Py_ssize_t _last_nonzero(const unsigned char[::1] buf, Py_ssize_t start) noexcept:
    """Offset just past the last nonzero byte at or after `start` (start if there is none)."""
    cdef Py_ssize_t i = buf.shape[0]
    with nogil:
        while i > start and buf[i - 1] == 0:
            i -= 1
    return i


def _frame_records(const unsigned char[::1] buf, Py_ssize_t off):
    """The (type, payload) records of the verified frame at `off`."""
    cdef const unsigned char* p = &buf[off]
    cdef uint16_t count = pmq_load_u16(p + 12)
    cdef Py_ssize_t roff = FRAME_HEADER
    cdef uint32_t rlen
    cdef list out = []
    for _ in range(count):
        rlen = pmq_load_u32(p + roff)
        out.append(PyBytes_FromStringAndSize(<const char*>(p + roff + RECORD_HEADER), rlen))
        roff += RECORD_HEADER + rlen
    return out


def _frame_at(const unsigned char[::1] buf, Py_ssize_t off, uint64_t salt, int64_t expected,
              size_t max_frame):
    """(status, record count, flags, frame_len, first record type) of the frame at `off`."""
    cdef FrameInfo info
    cdef FrameStatus status
    if buf.shape[0] == 0:
        return FRAME_ZERO, 0, 0, 0, 0
    status = _check_frame(&buf[0], off, buf.shape[0], salt, expected, max_frame, &info)
    if status != FRAME_OK:
        return status, 0, 0, 0, 0
    return status, info.count, info.flags, info.frame_len, buf[off + FRAME_HEADER + 4]
