# cython: language_level=3, embedsignature=True
"""pmq's write-ahead log: segments of checksummed frames, group commit, recovery.

Owns: the bytes of docs/FORMAT.md, sequence numbers, group commit and durability, recovery,
and deleting or copying what the layer above says it no longer needs. Must not: know what a
record means (calls, queues and peers belong to pmq.store).

Invariants (docs/journal.md explains them for users):
1. Nobody is told `seq` is durable before an fsync that covers its frame has returned, and the
   segment's name was fsynced into its directory before anything in it was acknowledged.
2. A frame's durable_seq claim never exceeds what an fsync had completed when it was written:
   the leader reads durable_seq before it writes, and a roll fsyncs the old segment first.
3. Frames are written only by the leader (the one thread holding `_leader`), at `_write_off`,
   in the active segment; the pending buffer only ever holds frames that fit in it.
4. The mutex is never held while the GIL is being acquired: threads holding the GIL may block
   on the mutex, and the mutex holder never needs the GIL, so neither can deadlock.
5. After a failed write or fsync the journal is failed for good: no fsync is retried.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
)

import array
import asyncio
import bisect
import struct
import logging
import mmap
import threading
import time
from typing import NamedTuple

from pmq.errors import JournalCorruption, JournalError, JournalFailed, JournalLocked, StorageFull

cdef extern from "_platform.h" nogil:
    ctypedef struct pmq_mutex_t:
        pass
    ctypedef struct pmq_cond_t:
        pass
    void pmq_mutex_init(pmq_mutex_t* m)
    void pmq_mutex_destroy(pmq_mutex_t* m)
    void pmq_mutex_lock(pmq_mutex_t* m)
    void pmq_mutex_unlock(pmq_mutex_t* m)
    void pmq_cond_init(pmq_cond_t* c)
    void pmq_cond_destroy(pmq_cond_t* c)
    void pmq_cond_wait(pmq_cond_t* c, pmq_mutex_t* m)
    void pmq_cond_broadcast(pmq_cond_t* c)
    void pmq_cond_signal(pmq_cond_t* c)
    int64_t pmq_pwrite(int fd, const void* buf, size_t n, int64_t off)
    int pmq_datasync(int fd)
    int pmq_errno()
    uint64_t pmq_load_u64(const unsigned char* p)
    uint32_t pmq_load_u32(const unsigned char* p)
    uint16_t pmq_load_u16(const unsigned char* p)
    void pmq_store_u64(unsigned char* p, uint64_t v)
    void pmq_store_u32(unsigned char* p, uint32_t v)
    void pmq_store_u16(unsigned char* p, uint16_t v)
    int EINTR

cdef extern from "xxhash.h" nogil:
    ctypedef unsigned long long XXH64_hash_t
    XXH64_hash_t XXH3_64bits_withSeed(const void* data, size_t length, XXH64_hash_t seed)

log = logging.getLogger("pmq.journal")

# docs/FORMAT.md constants.
DEF SEGMENT_HEADER = 4096
DEF FRAME_HEADER = 32
DEF RECORD_HEADER = 8
DEF FRAME_VERSION = 1
DEF FLAG_CONTROL = 1
DEF REC_DATA = 1
DEF REC_SEAL = 2
DEF REC_LOWWATER = 3
DEF REC_CLOSE = 4
DEF SEAL_RESERVE = 64                 # room every segment keeps for its SEAL frame (48 bytes)
DEF FORMAT_VERSION = 1
DEF FRAME_TARGET_BYTES = 1048576      # appends share a frame until it reaches this size
DEF PENDING_WRITE_BYTES = 4194304     # an append past this much pending data writes it out
DEF MAX_FRAME_LIMIT = 16777216

MAGIC = b"PMQJRNL\0"
SEGMENT_HEADER_BYTES = SEGMENT_HEADER
FRAME_HEADER_BYTES = FRAME_HEADER
RECORD_HEADER_BYTES = RECORD_HEADER
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
MIN_SEGMENT_BYTES = 64 * 1024
MAX_SEGMENT_BYTES = 1024 * 1024 * 1024
_DURABILITY = ("always", "interval", "never")
_PREALLOC = ("zero", "allocate", "none")
# replay() remembers where frames start, one place in each MARK_BYTES of a segment, so that
# reading back a record walks at most this far instead of from the start of its segment.
MARK_BYTES = 64 * 1024

# The fault hook (docs/journal.md "Test hook"): plain C globals, one compare per syscall.
DEF FAULT_WRITE = 1
DEF FAULT_SYNC = 2
DEF FAULT_PREPARE = 3
cdef int _fault_op = 0
cdef long _fault_countdown = 0
cdef int _fault_errno = 0
cdef long _fault_short = 0

cdef int _fault_fires(int op) noexcept nogil:
    global _fault_countdown
    if _fault_op != op:
        return 0
    if _fault_countdown > 1:
        _fault_countdown -= 1
        return 0
    _fault_countdown = 0
    return 1


def _set_fault(str op, long countdown, int errno, long short_bytes=0):
    """Make the `countdown`-th next `op` ("write", "sync", "prepare") and every one after it fail
    with `errno` until _clear_faults(); a failing write first writes `short_bytes` bytes."""
    global _fault_op, _fault_countdown, _fault_errno, _fault_short
    ops = {"write": FAULT_WRITE, "sync": FAULT_SYNC, "prepare": FAULT_PREPARE}
    if op not in ops:
        raise ValueError(f"unknown fault op {op!r}; expected one of {sorted(ops)}")
    if countdown < 1:
        raise ValueError("countdown must be at least 1")
    _fault_op, _fault_countdown, _fault_errno, _fault_short = ops[op], countdown, errno, short_bytes


def _clear_faults():
    global _fault_op, _fault_countdown, _fault_errno, _fault_short
    _fault_op = _fault_countdown = _fault_errno = _fault_short = 0


include "_journal_scan.pxi"
include "_journal_files.pxi"
include "_journal_recovery.pxi"
include "_journal_commit.pxi"


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


cdef class Journal(_GroupCommit):
    """A segmented write-ahead log with group commit; see docs/journal.md.

    Args:
        directory: the journal's directory; created if missing.
        segment_bytes: size of each segment file (at least 64 KiB).
        durability: "always" (sync returns after fsync), "interval" (fsync every `interval_ms`)
            or "never" (fsync only on roll and close; tests and benchmarks).
        interval_ms: the background fsync period with "interval".
        prealloc: how spare segments are prepared: "zero", "allocate" or "none".
        max_frame_bytes: the largest frame (one payload, or one append_many batch, must fit).
        on_corruption: "raise" (default) or "salvage" (skip damaged frames, list them in
            `salvaged`).

    Raises:
        JournalLocked: the directory is open elsewhere.
        JournalCorruption: recovery found damage a crash cannot explain.
        StorageFull: there is no room for the first segment.
    """

    cdef readonly bytes journal_id
    cdef readonly str prealloc
    cdef readonly Py_ssize_t segment_bytes
    cdef readonly list salvaged
    cdef int64_t _floor
    cdef list _segments                 # [[base, path]], oldest first; the last is active
    cdef dict _skips                    # path -> {bad offset: (resume offset, resume seq)}
    cdef dict _marks                    # path -> (array of seqs, array of offsets) of frames
    cdef object _lock
    cdef object _spare_cond, _spare, _spare_thread
    cdef object _interval_thread, _stop_event
    cdef double _interval_s

    def __init__(self, directory, *, Py_ssize_t segment_bytes=DEFAULT_SEGMENT_BYTES,
                 str durability="always", double interval_ms=50.0, prealloc=None,
                 max_frame_bytes=None, str on_corruption="raise"):
        if durability not in _DURABILITY:
            raise ValueError(f"durability must be one of {_DURABILITY}, not {durability!r}")
        if prealloc is None:
            prealloc = _default_prealloc(durability)
        if prealloc not in _PREALLOC:
            raise ValueError(f"prealloc must be one of {_PREALLOC}, not {prealloc!r}")
        if on_corruption not in ("raise", "salvage"):
            raise ValueError(f"on_corruption must be 'raise' or 'salvage', not {on_corruption!r}")
        if not MIN_SEGMENT_BYTES <= segment_bytes <= MAX_SEGMENT_BYTES or segment_bytes % 8:
            raise ValueError(
                f"segment_bytes must be a multiple of 8 from {MIN_SEGMENT_BYTES} to "
                f"{MAX_SEGMENT_BYTES}, not {segment_bytes}"
            )
        room = (segment_bytes - SEGMENT_HEADER - SEAL_RESERVE) // 2 & ~7
        if max_frame_bytes is None:
            max_frame_bytes = min(MAX_FRAME_LIMIT, room)
        if not 4096 <= max_frame_bytes <= min(MAX_FRAME_LIMIT, room):
            raise ValueError(
                f"max_frame_bytes must be from 4096 to {min(MAX_FRAME_LIMIT, room)} "
                f"(half a segment, at most 16 MiB), not {max_frame_bytes}"
            )
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, not {interval_ms}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.durability = durability
        self.prealloc = prealloc
        self.segment_bytes = segment_bytes
        self.max_frame_bytes = max_frame_bytes
        self.max_payload_bytes = max_frame_bytes - FRAME_HEADER - RECORD_HEADER
        self._max_frame = max_frame_bytes
        self._frame_target = min(FRAME_TARGET_BYTES, max_frame_bytes)
        self._seg_limit = segment_bytes - SEAL_RESERVE
        self._seg_half = segment_bytes // 2
        self._want_durable = durability == "always"
        self._interval_s = interval_ms / 1000.0
        self.salvaged = []
        self._skips = {}
        self._marks = {}
        self._async_waiters = []
        self._spare_cond = threading.Condition()
        self._pend_cap = self._wbuf_cap = 1 << 16
        self._pend = <unsigned char*>malloc(self._pend_cap)
        self._wbuf = <unsigned char*>malloc(self._wbuf_cap)
        if self._pend == NULL or self._wbuf == NULL:
            raise MemoryError()
        self._open(on_corruption == "salvage")
        if durability == "interval":
            self._stop_event = threading.Event()
            self._interval_thread = threading.Thread(
                target=self._interval_loop, name="pmq-journal-interval", daemon=True)
            self._interval_thread.start()

    # ---- opening -------------------------------------------------------------------------

    def _open(self, bint salvage):
        created = not os.path.isdir(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        if created:
            _fsync_directory(os.path.dirname(self.directory) or ".")   # the new directory's name
        self._lock = _Lock(self.directory)
        try:
            state = _recover(self.directory, self._max_frame, salvage)
            if state is None:
                self._create_first_segment()
            else:
                self._adopt(state)
        except BaseException:
            self._lock.release()
            raise

    def _create_first_segment(self):
        self.journal_id = os.urandom(16)
        self._floor = 1
        self._segments = []
        self._install_segment(self._take_spare(), 1, 0)
        self._next_seq = 1
        self._written_seq = self._durable_seq = 0

    def _adopt(self, state):
        self.journal_id = state.journal_id
        self._floor = state.floor
        self._segments = [[base, path] for base, path in state.segments]
        self._skips = state.skips
        self.salvaged = [SalvagedRange(*r) for r in state.salvaged]
        fd = os.open(state.segments[-1][1], os.O_RDWR | _O_BINARY)
        self._fd = fd
        self._salt = state.salt
        self._write_off = self._seg_used = state.end_offset
        self._next_seq = state.next_seq
        self._written_seq = self._durable_seq = state.next_seq - 1

    def _install_segment(self, str spare, int64_t base, int64_t prev_base):
        """Publish a prepared spare as segment `base` and make it the active one."""
        cdef uint64_t salt = int.from_bytes(os.urandom(8), "little")
        header = _build_segment_header(
            self.journal_id, salt, base, prev_base, self._floor, time.time_ns())
        fd = os.open(spare, os.O_RDWR | _O_BINARY)
        try:
            _pwrite_all(fd, header, 0)
            # A named segment must have a durable header (FORMAT.md invariant): fsync before rename.
            self._fsync_checked(fd)
        finally:
            os.close(fd)
        path = os.path.join(self.directory, _segment_name(base))
        os.replace(spare, path)
        # Until the directory is fsynced a crash may forget the new name; nothing in the
        # segment is acknowledged before this returns, so losing it loses nothing.
        _fsync_directory(self.directory)
        fd = os.open(path, os.O_RDWR | _O_BINARY)
        pmq_mutex_lock(&self._mu)
        self._fd = fd
        self._salt = salt
        self._write_off = SEGMENT_HEADER
        self._seg_used = SEGMENT_HEADER + self._pend_len
        self._spare_asked = False
        pmq_mutex_unlock(&self._mu)
        self._segments.append([base, path])

    # ---- spares --------------------------------------------------------------------------

    def _take_spare(self):
        with self._spare_cond:
            while self._spare_thread is not None:
                self._spare_cond.wait()
            spare, self._spare = self._spare, None
        if spare is not None:
            return spare
        return _prepare_spare(self.directory, self.segment_bytes, self.prealloc)

    def _ask_for_spare(self):
        with self._spare_cond:
            if self._spare is not None or self._spare_thread is not None or self._closed:
                return
            self._spare_thread = threading.Thread(
                target=self._prepare_spare_in_background, name="pmq-journal-spare", daemon=True)
            self._spare_thread.start()

    def _prepare_spare_in_background(self):
        try:
            spare = _prepare_spare(self.directory, self.segment_bytes, self.prealloc)
        except JournalError as exc:
            spare = None    # the roll that needs it prepares one itself and reports the error
            log.debug("preparing a spare segment in %s failed: %s", self.directory, exc)
        with self._spare_cond:
            self._spare = spare
            self._spare_thread = None
            self._spare_cond.notify_all()

    # ---- making room ---------------------------------------------------------------------

    cdef int _roll_for(self, Py_ssize_t need) except -1:
        """Become leader and start a new segment unless someone already made room."""
        cdef int rc
        cdef bint fits
        with nogil:
            rc = self._acquire_leadership()
        if rc != 0:
            self._raise_unusable()
        try:
            pmq_mutex_lock(&self._mu)
            fits = self._seg_used + need <= self._seg_limit
            pmq_mutex_unlock(&self._mu)
            if fits:
                return 0
            with nogil:
                rc = self._lead_flush(False)
            if rc != 0:
                self._raise_unusable()
            self._roll()
        finally:
            with nogil:
                self._release_leadership()
        return 0

    def _roll(self):
        """Seal the active segment and publish the next one (docs/FORMAT.md; leadership held).

        Order, and the crash each step survives: (1) fsync the old segment, so nothing in it can
        be torn once a successor exists; (2) fsync the new segment's header, rename it into place,
        fsync the directory; (3) write and fsync SEAL in the old segment. A crash between 2 and 3
        leaves an unsealed segment and an empty successor, which recovery seals.
        """
        cdef int64_t new_base, claim, seal_off
        cdef uint64_t old_salt = self._salt
        old_fd = self._fd
        old_base = self._segments[-1][0]
        try:
            self._fsync_checked(old_fd)
        except OSError as exc:
            self._fail_from(FAULT_SYNC, exc)
        pmq_mutex_lock(&self._mu)
        self._durable_seq = self._written_seq
        self._unsynced = False
        self._st_fsyncs += 1
        new_base = self._written_seq + 1
        claim = self._durable_seq
        seal_off = self._write_off
        self._wake_all()
        pmq_mutex_unlock(&self._mu)
        spare = self._take_spare()        # StorageFull leaves everything as it was
        try:
            self._install_segment(spare, new_base, old_base)
            _pwrite_all(old_fd, _build_control_frame(REC_SEAL, new_base, new_base, claim, old_salt),
                        seal_off)
            self._fsync_checked(old_fd)
        except OSError as exc:
            self._fail_from(FAULT_SYNC, exc)
        finally:
            os.close(old_fd)
        self._st_fsyncs += 1

    def _interval_loop(self):
        while not self._stop_event.wait(self._interval_s):
            if self._failed or self._closed:
                return
            try:
                self._flush_now(True)
            except (JournalFailed, ValueError):
                return

    # ---- reading back --------------------------------------------------------------------

    @property
    def floor(self):
        """Records below this seq were released and are never replayed."""
        return self._floor

    def replay(self, int64_t start_seq=1, stop_seq=None):
        """Yield (seq, payload) for the records on disk with start_seq <= seq < stop_seq.

        Records below the floor are skipped; records not yet written (see sync) are not seen.

        Raises:
            JournalCorruption: a segment was damaged after the journal was opened.
        """
        if self._closed:
            self._raise_unusable()
        cdef int64_t hi = self._written_seq + 1
        if stop_seq is not None and stop_seq < hi:
            hi = stop_seq
        return self._replay(max(start_seq, self._floor), hi, [list(s) for s in self._segments])

    def _replay(self, int64_t lo, int64_t hi, list segments):
        cdef Py_ssize_t off, count, flen, last = len(segments) - 1
        cdef int64_t expected, end_seq
        cdef int status
        for index, (base, path) in enumerate(segments):
            end_seq = segments[index + 1][0] if index < last else hi
            if end_seq <= lo:
                continue
            if base >= hi:
                break
            try:
                mapped = _Mapped(path)
            except FileNotFoundError:
                if base < self._floor:
                    continue    # released while we were reading
                raise
            try:
                view = mapped.view
                salt = _parse_segment_header(view[:SEGMENT_HEADER], path).salt
                skips = self._skips.get(path, {})
                marks = self._marks.get(path)
                if marks is None:
                    marks = self._marks[path] = (array.array("q", [base]),
                                                 array.array("q", [SEGMENT_HEADER]))
                mark_seqs, mark_offs = marks
                mark = max(bisect.bisect_right(mark_seqs, lo) - 1, 0)
                off = mark_offs[mark]
                expected = mark_seqs[mark]
                while expected < hi:
                    status, count, flags, flen, first_type = _frame_at(
                        view, off, salt, expected, self._max_frame)
                    if status == FRAME_OK:
                        if flags & FLAG_CONTROL:
                            if first_type == REC_SEAL:
                                break
                        else:
                            if off - mark_offs[-1] >= MARK_BYTES and expected > mark_seqs[-1]:
                                mark_seqs.append(expected)
                                mark_offs.append(off)
                            if expected + count > lo:
                                for k, payload in enumerate(_frame_records(view, off)):
                                    if lo <= expected + k < hi:
                                        yield expected + k, payload
                            expected += count
                        off += _align8(flen)
                    elif off in skips:
                        off, expected = skips[off]
                        if off < 0:
                            break
                    elif index == last:
                        break       # the end of the written data, or a frame being written now
                    else:
                        raise JournalCorruption(
                            f"damaged frame at seq {expected} ({_FRAME_STATUS_TEXT[status]})",
                            path, off)
            finally:
                mapped.close()

    # ---- winning space back --------------------------------------------------------------

    def release_before(self, int64_t seq):
        """Declare every record below `seq` no longer needed; delete the segments that frees.

        The new floor is made durable (a LOWWATER frame, fsynced) before any file is unlinked,
        so a crash that undoes an unlink cannot bring released records back. Returns the number
        of segments deleted (the active segment is never deleted).
        """
        cdef int rc
        cdef bytes value
        if self._failed or self._closed:
            self._raise_unusable()
        if seq > self._next_seq:
            raise ValueError(f"cannot release up to seq {seq}: the next seq is {self._next_seq}")
        if seq > self._floor:
            # The floor rises only once its LOWWATER is durable: if the append is refused
            # (StorageFull) nothing changed, and a retry writes it.
            value = struct.pack("<Q", seq)
            self._append_record(<const unsigned char*>PyBytes_AS_STRING(value), 8, REC_LOWWATER)
            self._flush_now(True)
            self._floor = seq
        seq = self._floor   # segments that fell below the floor since the last call go too
        with nogil:
            rc = self._acquire_leadership()
        if rc != 0:
            self._raise_unusable()
        doomed = []
        try:
            while len(self._segments) > 1 and self._segments[1][0] <= seq:
                doomed.append(self._segments.pop(0)[1])
            for path in doomed:
                os.unlink(path)
                self._skips.pop(path, None)
                self._marks.pop(path, None)
        finally:
            with nogil:
                self._release_leadership()
        if doomed:
            _fsync_directory(self.directory)     # the unlinks; LOWWATER already covers a lost one
        return len(doomed)

    def copy_forward(self, seqs):
        """Re-append the payloads of `seqs` (durably) and return {old seq: new seq}.

        For the few long-pending records that would otherwise pin an old segment: once the
        caller has the new seqs it can release_before() past the old ones.

        Raises:
            ValueError: a seq is below the floor or was never appended.
        """
        wanted = sorted(set(int(s) for s in seqs))
        if not wanted:
            return {}
        if wanted[0] < self._floor or wanted[-1] >= self._next_seq:
            raise ValueError(
                f"seqs must lie in [{self._floor}, {self._next_seq}) to be copied forward; "
                f"got {wanted[0]}..{wanted[-1]}")
        self._flush_now(False)
        wanted_set = set(wanted)
        found = {}
        bases = [s[0] for s in self._segments]
        groups = {}
        for seq in wanted:
            groups.setdefault(bisect.bisect_right(bases, seq) - 1, []).append(seq)
        for group in groups.values():
            for seq, payload in self.replay(group[0], group[-1] + 1):
                if seq in wanted_set:
                    found[seq] = payload
        missing = [s for s in wanted if s not in found]
        if missing:
            raise ValueError(f"seqs not found in the journal: {missing[:10]}")
        mapping = {}
        chunk = []
        size = FRAME_HEADER
        for seq in wanted:
            payload = found[seq]
            full = size + RECORD_HEADER + len(payload) > self.max_frame_bytes
            if chunk and (full or len(chunk) == 65535):
                self._copy_chunk(chunk, found, mapping)
                chunk, size = [], FRAME_HEADER
            chunk.append(seq)
            size += RECORD_HEADER + len(payload)
        self._copy_chunk(chunk, found, mapping)
        self._flush_now(True)
        return mapping

    def _copy_chunk(self, list chunk, dict found, dict mapping):
        last = self.append_many([found[s] for s in chunk])
        for i, seq in enumerate(chunk):
            mapping[seq] = last - len(chunk) + 1 + i

    # ---- looking at it -------------------------------------------------------------------

    def segments(self):
        """[SegmentInfo] of the journal's segments, oldest first; the last is active."""
        segs = [list(s) for s in self._segments]
        out = []
        for index, (base, path) in enumerate(segs):
            active = index == len(segs) - 1
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                continue
            out.append(SegmentInfo(path, base, self._next_seq if active else segs[index + 1][0],
                                   size, active))
        return out

    def stats(self):
        """Counters since open: records appended and written, frames, flushes, fsyncs, bytes,
        mean_batch (records written per flush) and segments."""
        flushes = self._st_flushes
        return {
            "records": self._st_records,
            "records_written": self._st_written,
            "frames": self._st_frames,
            "flushes": flushes,
            "fsyncs": self._st_fsyncs,
            "bytes": self._st_bytes,
            "mean_batch": self._st_written / flushes if flushes else 0.0,
            "segments": len(self._segments),
            "durable_seq": self._durable_seq,
            "next_seq": self._next_seq,
        }

    # ---- closing -------------------------------------------------------------------------

    def close(self):
        """Write everything, fsync, mark a clean end (CLOSE) and release the directory.

        Raises:
            JournalFailed: the final write or fsync failed (never swallowed).
        """
        if self._closed:
            return
        error = None
        if not self._failed:
            try:
                # Make everything durable first: CLOSE claims durable_seq as it stands when it
                # is written, and it must cover every record (docs/FORMAT.md).
                self._flush_now(True)
                try:
                    self._append_record(NULL, 0, REC_CLOSE)
                    self._flush_now(True)
                except StorageFull:
                    # Everything is durable; only the clean-end marker did not fit. The next
                    # open recovers as after a crash, losing nothing.
                    log.warning("journal %s: no room for the CLOSE frame; closed without it",
                                self.directory)
            except JournalFailed as exc:
                error = exc
        pmq_mutex_lock(&self._mu)
        self._closed = True
        self._wake_all()
        pmq_cond_broadcast(&self._async_cv)
        pmq_mutex_unlock(&self._mu)
        if self._stop_event is not None:
            self._stop_event.set()
        for thread in (self._interval_thread, self._async_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join()
        with self._spare_cond:
            while self._spare_thread is not None:
                self._spare_cond.wait()
            spare, self._spare = self._spare, None
        if spare is not None:
            try:
                os.unlink(spare)
            except OSError:
                pass
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._lock.release()
        if error is not None:
            raise error

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else "failed" if self._failed else "open"
        return (f"<Journal {self.directory!r} {state} durability={self.durability} "
                f"next_seq={self._next_seq} durable_seq={self._durable_seq}>")
