# The group-commit core of the journal (included by _journal.pyx).
#
# Owns: the pending buffer, sequence numbers, leadership, the write + fsync of a batch, waiting
# (threads and asyncio) and the failed state. Must not: open, name, roll or delete segment files:
# Journal (the subclass in _journal.pyx) does that, through _roll_for() and _ask_for_spare().

cdef void _resolve_futures(list futures, object error) noexcept:
    for fut in futures:
        if not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


def _resolve_batch(list futures, object error):
    _resolve_futures(futures, error)


cdef class _GroupCommit:
    """Appends, leadership and durability waiting; Journal adds the files around it."""

    cdef pmq_mutex_t _mu
    cdef pmq_cond_t _cv                 # leadership was released, or the journal failed/closed
    # Threads waiting in _wait_for for a flush to end sleep on the condition of that flush's
    # parity: those its swap took wake when it ends, and one of the others to lead the next.
    # One condition broadcast per flush woke every waiter at each fsync, most of them to
    # sleep again: a context switch each (docs/decisions.md).
    cdef pmq_cond_t _cv_even, _cv_odd
    cdef int _sleeping[2]               # threads asleep on each of them
    cdef uint64_t _flush_gen            # flushes swapped so far (parity: the condition)
    cdef int64_t _flush_upto            # the last seq the latest swapped flush holds
    cdef pmq_cond_t _async_cv           # the asyncio flusher has a new target (or must stop)
    cdef bint _sync_ready
    cdef unsigned char* _pend          # frames appended since the last swap (mutex)
    cdef size_t _pend_len, _pend_cap
    cdef unsigned char* _wbuf           # the buffer the leader is writing (leader only)
    cdef size_t _wbuf_cap
    cdef Py_ssize_t _frame_off          # offset in _pend of the open frame, -1 if none
    cdef uint32_t _frame_count
    cdef int _frame_kind
    cdef int64_t _frame_first
    cdef int64_t _next_seq, _written_seq, _durable_seq
    cdef int64_t _seg_used, _seg_limit, _seg_half
    cdef int64_t _write_off             # leader only
    cdef int _fd                        # leader only
    cdef uint64_t _salt                 # leader only
    cdef bint _leader, _failed, _closed, _unsynced, _want_durable, _spare_asked
    cdef int _fail_errno, _fail_op
    cdef int64_t _async_target
    cdef size_t _max_frame, _frame_target
    cdef uint64_t _st_records, _st_written, _st_frames, _st_flushes, _st_fsyncs, _st_bytes
    cdef readonly str directory
    cdef readonly str durability
    cdef readonly Py_ssize_t max_frame_bytes
    cdef readonly Py_ssize_t max_payload_bytes
    cdef list _async_waiters
    cdef object _async_thread
    cdef object __weakref__

    def __cinit__(self):
        self._fd = -1
        self._frame_off = -1
        pmq_mutex_init(&self._mu)
        pmq_cond_init(&self._cv)
        pmq_cond_init(&self._cv_even)
        pmq_cond_init(&self._cv_odd)
        pmq_cond_init(&self._async_cv)
        self._sync_ready = True

    def __dealloc__(self):
        if self._fd >= 0 and not self._closed:
            os.close(self._fd)     # no CLOSE frame: a journal not closed looks like a crash
        free(self._pend)
        free(self._wbuf)
        if self._sync_ready:
            pmq_cond_destroy(&self._cv)
            pmq_cond_destroy(&self._cv_even)
            pmq_cond_destroy(&self._cv_odd)
            pmq_cond_destroy(&self._async_cv)
            pmq_mutex_destroy(&self._mu)

    cdef int _fsync_checked(self, int fd) except -1:
        cdef int rc, err = 0
        with nogil:
            rc = self._datasync(fd, &err)
        if rc != 0:
            raise OSError(err, os.strerror(err))
        return 0

    cdef int _datasync(self, int fd, int* err) noexcept nogil:
        if _fault_fires(FAULT_SYNC):
            err[0] = _fault_errno
            return -1
        if pmq_datasync(fd) != 0:
            err[0] = pmq_errno()
            return -1
        return 0

    cdef int _write_all(self, const unsigned char* buf, size_t n, int64_t off,
                        int* err) noexcept nogil:
        global _fault_short
        cdef int64_t w
        while n > 0:
            if _fault_fires(FAULT_WRITE):
                if _fault_short > 0:
                    w = pmq_pwrite(self._fd, buf, min(<size_t>_fault_short, n), off)
                    _fault_short = 0
                    if w > 0:
                        buf += w
                        n -= <size_t>w
                        off += w
                        continue
                err[0] = _fault_errno
                return -1
            w = pmq_pwrite(self._fd, buf, n, off)
            if w < 0:
                if pmq_errno() == EINTR:
                    continue
                err[0] = pmq_errno()
                return -1
            buf += w
            n -= <size_t>w
            off += w
        return 0

    cdef void _close_frame(self) noexcept nogil:
        """Finish the open frame's header and pad it (mutex held)."""
        cdef unsigned char* p
        cdef size_t padded
        if self._frame_off < 0:
            return
        p = self._pend + self._frame_off
        pmq_store_u32(p + 8, <uint32_t>(self._pend_len - self._frame_off))
        pmq_store_u16(p + 12, <uint16_t>self._frame_count)
        p[14] = FRAME_VERSION
        p[15] = FLAG_CONTROL if self._frame_kind else 0
        pmq_store_u64(p + 16, <uint64_t>self._frame_first)
        padded = <size_t>_align8(self._pend_len)
        memset(self._pend + self._pend_len, 0, padded - self._pend_len)
        self._seg_used += <int64_t>(padded - self._pend_len)
        self._pend_len = padded
        self._frame_off = -1

    cdef int _lead_flush(self, bint durable) noexcept nogil:
        """Write everything pending, then fsync if `durable` (leadership held, mutex not)."""
        cdef unsigned char* buf
        cdef size_t n, cap, off = 0, flen
        cdef int64_t upto, claim
        cdef int err = 0, op = 0
        cdef uint64_t frames = 0, records = 0
        cdef bint synced = False
        pmq_mutex_lock(&self._mu)
        self._close_frame()
        buf = self._pend
        n = self._pend_len
        cap = self._pend_cap
        self._pend = self._wbuf
        self._pend_cap = self._wbuf_cap
        self._pend_len = 0
        self._wbuf = buf
        self._wbuf_cap = cap
        upto = self._next_seq - 1
        claim = self._durable_seq
        self._flush_gen += 1
        self._flush_upto = upto
        pmq_mutex_unlock(&self._mu)
        if n > 0:
            while off < n:
                flen = pmq_load_u32(buf + off + 8)
                pmq_store_u64(buf + off + 24, <uint64_t>claim)
                pmq_store_u64(buf + off, _frame_checksum(buf + off, flen, self._salt))
                if (buf[off + 15] & FLAG_CONTROL) == 0:
                    records += pmq_load_u16(buf + off + 12)
                frames += 1
                off += <size_t>_align8(flen)
            if self._write_all(buf, n, self._write_off, &err) != 0:
                op = FAULT_WRITE
            else:
                self._write_off += <int64_t>n
        if op == 0 and durable and (n > 0 or self._unsynced):
            if self._datasync(self._fd, &err) != 0:
                op = FAULT_SYNC
            else:
                synced = True
        pmq_mutex_lock(&self._mu)
        if op != 0:
            self._fail(op, err)
        else:
            self._written_seq = upto
            if synced:
                self._durable_seq = upto
                self._unsynced = False
                self._st_fsyncs += 1
            elif n > 0:
                self._unsynced = True
            if n > 0:
                self._st_flushes += 1
                self._st_frames += frames
                self._st_written += records
                self._st_bytes += n
        pmq_mutex_unlock(&self._mu)
        return -1 if op != 0 else 0

    cdef void _fail(self, int op, int err) noexcept nogil:
        """Mark the journal failed for good (mutex held) and wake every waiter."""
        if not self._failed:
            self._failed = True
            self._fail_op = op
            self._fail_errno = err
        self._wake_all()
        pmq_cond_broadcast(&self._async_cv)

    cdef pmq_cond_t* _flush_cv(self, int parity) noexcept nogil:
        return &self._cv_odd if parity else &self._cv_even

    cdef void _wake_all(self) noexcept nogil:
        """Wake every thread waiting for durability or leadership (mutex held): the levels
        moved outside a flush (a segment roll), or the journal failed or closed."""
        pmq_cond_broadcast(&self._cv)
        pmq_cond_broadcast(&self._cv_even)
        pmq_cond_broadcast(&self._cv_odd)

    cdef void _wake_after_flush(self) noexcept nogil:
        """Leadership was just released (mutex held): wake the threads the latest flush took,
        one of those it did not (to lead the next flush; the rest wait for that one to end),
        and whoever waits to lead.

        Liveness: whenever anyone sleeps in _wait_for, a release wakes at least one of them,
        and a thread sleeps there only while someone leads.
        """
        cdef int done = <int>(self._flush_gen & 1)
        if self._sleeping[done]:
            pmq_cond_broadcast(self._flush_cv(done))
        if self._sleeping[1 - done]:
            pmq_cond_signal(self._flush_cv(1 - done))
        pmq_cond_broadcast(&self._cv)

    cdef int _acquire_leadership(self) noexcept nogil:
        pmq_mutex_lock(&self._mu)
        while self._leader and not self._failed:
            pmq_cond_wait(&self._cv, &self._mu)
        if self._failed:
            pmq_mutex_unlock(&self._mu)
            return -1
        self._leader = True
        pmq_mutex_unlock(&self._mu)
        return 0

    cdef void _release_leadership(self) noexcept nogil:
        pmq_mutex_lock(&self._mu)
        self._leader = False
        self._wake_after_flush()
        pmq_mutex_unlock(&self._mu)

    cdef int _wait_for(self, int64_t seq, bint durable) noexcept nogil:
        """Return once `seq` is durable (or written); lead a flush when nobody else is."""
        cdef int64_t level
        cdef int parity
        pmq_mutex_lock(&self._mu)
        while True:
            if self._failed:
                pmq_mutex_unlock(&self._mu)
                return -1
            level = self._durable_seq if durable else self._written_seq
            if level >= seq:
                pmq_mutex_unlock(&self._mu)
                return 0
            if not self._leader:
                self._leader = True
                pmq_mutex_unlock(&self._mu)
                self._lead_flush(durable)
                pmq_mutex_lock(&self._mu)
                self._leader = False
                self._wake_after_flush()
                continue
            # Someone leads: sleep until the flush that holds seq ends, the one under way if
            # its swap took seq, else the next (whose leader is woken among us).
            parity = <int>(self._flush_gen & 1) if seq <= self._flush_upto else <int>(
                (self._flush_gen + 1) & 1)
            self._sleeping[parity] += 1
            pmq_cond_wait(self._flush_cv(parity), &self._mu)
            self._sleeping[parity] -= 1

    cdef int _flush_now(self, bint durable) except -1:
        """Write (and fsync) whatever is pending, including control frames that take no seq."""
        cdef int rc
        with nogil:
            rc = self._acquire_leadership()
            if rc == 0:
                rc = self._lead_flush(durable)
                self._release_leadership()
        if rc != 0:
            self._raise_unusable()
        return 0

    def _raise_unusable(self):
        if self._failed:
            what = {FAULT_WRITE: "a write", FAULT_SYNC: "an fsync"}.get(
                self._fail_op, "a file operation")
            raise JournalFailed(
                f"journal {self.directory} failed: {what} returned "
                f"{os.strerror(self._fail_errno) if self._fail_errno else 'an error'}; it accepts "
                "nothing more (fsync is never retried). Everything acknowledged before is on disk: "
                "close the journal and open it again to _recover."
            )
        if self._closed:
            raise ValueError(f"I/O operation on closed journal {self.directory}")

    def _fail_from(self, int op, exc):
        pmq_mutex_lock(&self._mu)
        self._fail(op, exc.errno or 0)
        pmq_mutex_unlock(&self._mu)
        self._raise_unusable()

    @property
    def next_seq(self):
        """The seq the next data record will get."""
        return self._next_seq

    @property
    def written_seq(self):
        """The highest seq handed to the OS (survives a killed process)."""
        return self._written_seq

    @property
    def durable_seq(self):
        """The highest seq covered by a completed fsync (survives a power cut)."""
        return self._durable_seq

    @property
    def closed(self):
        return self._closed

    @property
    def failed(self):
        """True once a write or fsync failed: the journal refuses all further work."""
        return self._failed

    cdef int _grow(self, size_t need) noexcept nogil:
        cdef size_t cap = self._pend_cap
        cdef unsigned char* grown
        while cap < need:
            cap *= 2
        grown = <unsigned char*>realloc(self._pend, cap)
        if grown == NULL:
            return -1
        self._pend = grown
        self._pend_cap = cap
        return 0

    cdef int _reserve(self, size_t need) noexcept nogil:
        """Make room for `need` more bytes (and a frame's padding) in the pending buffer."""
        if self._pend_len + need + 8 <= self._pend_cap:
            return 0
        return self._grow(self._pend_len + need + 8)

    cdef void _start_frame(self, bint control) noexcept nogil:
        self._frame_off = <Py_ssize_t>self._pend_len
        memset(self._pend + self._pend_len, 0, FRAME_HEADER)
        self._frame_first = self._next_seq
        self._frame_kind = control
        self._frame_count = 0
        self._pend_len += FRAME_HEADER
        self._seg_used += FRAME_HEADER

    cdef void _put_record(self, const unsigned char* data, size_t n, int rtype) noexcept nogil:
        cdef unsigned char* p = self._pend + self._pend_len
        pmq_store_u32(p, <uint32_t>n)
        p[4] = <unsigned char>rtype
        p[5] = 0
        pmq_store_u16(p + 6, 0)
        if n:
            memcpy(p + RECORD_HEADER, data, n)
        self._pend_len += RECORD_HEADER + n
        self._seg_used += <int64_t>(RECORD_HEADER + n)
        self._frame_count += 1

    cdef int64_t _append_record(self, const unsigned char* data, Py_ssize_t n, int rtype) except -1:
        cdef bint control = rtype != REC_DATA
        cdef bint join, ask, big
        cdef Py_ssize_t need
        cdef int64_t seq
        if n > self.max_payload_bytes:
            raise ValueError(
                f"payload of {n} bytes is over the journal's limit of {self.max_payload_bytes} "
                f"bytes (max_payload_bytes)")
        while True:
            pmq_mutex_lock(&self._mu)
            if self._failed or self._closed:
                pmq_mutex_unlock(&self._mu)
                self._raise_unusable()
            join = (self._frame_off >= 0 and self._frame_kind == control
                    and self._frame_count < 65535
                    and <size_t>(self._pend_len - self._frame_off + RECORD_HEADER + n)
                    <= self._frame_target)
            if join:
                need = RECORD_HEADER + n + 7
            else:
                need = (_align8(self._pend_len) - self._pend_len
                        + FRAME_HEADER + RECORD_HEADER + n + 7)
            if self._seg_used + need > self._seg_limit:
                pmq_mutex_unlock(&self._mu)
                self._roll_for(need)
                continue
            if self._reserve(need) != 0:
                pmq_mutex_unlock(&self._mu)
                raise MemoryError()
            if not join:
                self._close_frame()
                self._start_frame(control)
            self._put_record(data, n, rtype)
            seq = self._next_seq
            if not control:
                self._next_seq += 1
                self._st_records += 1
            big = self._pend_len >= PENDING_WRITE_BYTES and not self._leader
            ask = not self._spare_asked and self._seg_used > self._seg_half
            if ask:
                self._spare_asked = True
            pmq_mutex_unlock(&self._mu)
            break
        if ask:
            self._ask_for_spare()
        if big:
            self._write_pending()
        return seq

    def append(self, payload):
        """Append one record; return its seq. Buffered: call sync(seq) to wait for durability.

        Raises:
            TypeError: `payload` is not bytes-like.
            ValueError: it is over `max_payload_bytes`, or the journal is closed.
            StorageFull: the record needs a new segment and there is no room for one.
            JournalFailed: an earlier write or fsync failed.
        """
        cdef Py_buffer view
        if PyBytes_CheckExact(payload):
            return self._append_record(<const unsigned char*>PyBytes_AS_STRING(payload),
                                       PyBytes_GET_SIZE(payload), REC_DATA)
        if isinstance(payload, str) or not PyObject_CheckBuffer(payload):
            raise TypeError(f"payload must be bytes-like, not {type(payload).__name__}")
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            return self._append_record(<const unsigned char*>view.buf, view.len, REC_DATA)
        finally:
            PyBuffer_Release(&view)

    def append_many(self, payloads):
        """Append records in one frame (all of them survive a crash, or none); return the last seq.

        Raises:
            TypeError: an item is not bytes-like.
            ValueError: no payloads, more than 65535, or together over `max_frame_bytes`.
            StorageFull, JournalFailed: as for append().
        """
        cdef list items = []
        cdef Py_ssize_t total = FRAME_HEADER, need, i
        cdef int64_t last
        cdef bint ask, big
        cdef bytes item
        for i, payload in enumerate(payloads):
            if not PyBytes_CheckExact(payload):
                if isinstance(payload, str) or not PyObject_CheckBuffer(payload):
                    raise TypeError(
                        f"payloads[{i}] must be bytes-like, not {type(payload).__name__}")
                payload = bytes(payload)
            items.append(payload)
            total += RECORD_HEADER + PyBytes_GET_SIZE(payload)
        if not items:
            raise ValueError("append_many needs at least one payload")
        if len(items) > 65535:
            raise ValueError(
                f"append_many takes at most 65535 payloads in one frame, not {len(items)}")
        if total > self.max_frame_bytes:
            raise ValueError(
                f"append_many of {len(items)} payloads needs a {total}-byte frame, over the "
                f"journal's max_frame_bytes of {self.max_frame_bytes}")
        while True:
            pmq_mutex_lock(&self._mu)
            if self._failed or self._closed:
                pmq_mutex_unlock(&self._mu)
                self._raise_unusable()
            need = _align8(self._pend_len) - self._pend_len + total + 7
            if self._seg_used + need > self._seg_limit:
                pmq_mutex_unlock(&self._mu)
                self._roll_for(need)
                continue
            if self._reserve(need) != 0:
                pmq_mutex_unlock(&self._mu)
                raise MemoryError()
            self._close_frame()
            self._start_frame(False)
            for item in items:
                self._put_record(<const unsigned char*>PyBytes_AS_STRING(item),
                                 PyBytes_GET_SIZE(item), REC_DATA)
            self._close_frame()
            self._next_seq += len(items)
            self._st_records += len(items)
            last = self._next_seq - 1
            # As in _append_record: without these a writer of big frames rolled onto a spare it
            # had to zero-fill itself (a stall of a fifth of a second per segment, measured), and
            # its pending buffer waited for the next flush however large it grew.
            big = self._pend_len >= PENDING_WRITE_BYTES and not self._leader
            ask = not self._spare_asked and self._seg_used > self._seg_half
            if ask:
                self._spare_asked = True
            pmq_mutex_unlock(&self._mu)
            if ask:
                self._ask_for_spare()
            if big:
                self._write_pending()
            return last

    cdef void _write_pending(self):
        """Hand a large pending buffer to the OS if nobody is leading (bounds memory)."""
        with nogil:
            pmq_mutex_lock(&self._mu)
            if self._leader or self._failed:
                pmq_mutex_unlock(&self._mu)
            else:
                self._leader = True
                pmq_mutex_unlock(&self._mu)
                self._lead_flush(False)
                self._release_leadership()

    cdef int64_t _target(self, seq) except -2:
        cdef int64_t target
        if self._failed or self._closed:
            self._raise_unusable()
        if seq is None:
            return self._next_seq - 1
        target = seq
        if target >= self._next_seq:
            raise ValueError(f"seq {seq} has not been appended (the next seq is {self._next_seq})")
        return target

    def sync(self, seq=None):
        """Block, without the GIL, until `seq` (default: everything appended) is durable.

        With durability "interval" or "never" this waits until it is written to the OS.

        Raises:
            ValueError: `seq` was not appended yet, or the journal is closed.
            JournalFailed: the write or fsync covering it failed.
        """
        cdef int64_t target = self._target(seq)
        cdef int rc
        with nogil:
            rc = self._wait_for(target, self._want_durable)
        if rc != 0:
            self._raise_unusable()

    def sync_async(self, seq=None):
        """An asyncio Future of the running loop that completes when `seq` is durable.

        A flusher thread commits for every coroutine and resolves all the futures a batch
        covers with one call_soon_threadsafe per loop.
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        cdef int64_t target = self._target(seq)
        cdef int64_t level = self._durable_seq if self._want_durable else self._written_seq
        if level >= target:
            fut.set_result(None)
            return fut
        self._async_waiters.append((target, fut, loop))
        pmq_mutex_lock(&self._mu)
        if target > self._async_target:
            self._async_target = target
            # Only the flusher needs to know: waking every thread that waits for durability
            # here made them queue on the mutex while this (GIL-holding) thread needs it.
            pmq_cond_signal(&self._async_cv)
        pmq_mutex_unlock(&self._mu)
        if self._async_thread is None:
            self._async_thread = threading.Thread(
                target=self._async_loop, name="pmq-journal-async", daemon=True)
            self._async_thread.start()
        return fut

    def _async_loop(self):
        cdef int64_t target, scanned = 0
        cdef bint stop
        while True:
            with nogil:
                pmq_mutex_lock(&self._mu)
                while not self._closed and not self._failed and self._async_target <= scanned:
                    pmq_cond_wait(&self._async_cv, &self._mu)
                target = self._async_target
                stop = self._closed or self._failed
                pmq_mutex_unlock(&self._mu)
                if not stop:
                    self._wait_for(target, self._want_durable)
            scanned = target
            self._resolve_async()
            if stop:
                return

    def _resolve_async(self):
        cdef int64_t level = self._durable_seq if self._want_durable else self._written_seq
        waiters, self._async_waiters = self._async_waiters, []
        error = None
        if self._failed or self._closed:
            try:
                self._raise_unusable()
            except (JournalFailed, ValueError) as exc:
                error = exc
        keep = []
        batches = {}
        for item in waiters:
            seq, fut, loop = item
            if seq <= level:
                batches.setdefault((loop, None), []).append(fut)
            elif error is not None:
                batches.setdefault((loop, error), []).append(fut)
            else:
                keep.append(item)
        if keep:
            self._async_waiters[:0] = keep
        for (loop, exc), futures in batches.items():
            try:
                loop.call_soon_threadsafe(_resolve_batch, futures, exc)
            except RuntimeError:
                pass        # that event loop is closed: nobody is waiting on its futures

    cdef int _roll_for(self, Py_ssize_t need) except -1:
        raise NotImplementedError("Journal makes room by rolling segments")

    def _ask_for_spare(self):
        pass
