"""Runs accepted calls: handler lookup, worker threads, retries, deadlines, dead letters.

Owns: the registry of exposed objects, when each call runs (concurrency, order, backoff with
jitter, deadlines), running plain handlers on worker threads and ``async def`` handlers on the
event loop, what an outcome means (success, failure, Retry, Reject, not exposed, expired,
too many attempts or crashes), and ``current_call()``. Must not: know the wire or the disk
format; everything durable goes through pmq.store.

Invariants:
- A call's ATTEMPT record is durable before its handler starts (store.begin_attempts, then the
  journal's sync, on the event loop or by the worker that runs it), so a process that dies
  inside a handler is counted as a crash.
- This module holds the only broad ``except Exception``: a handler's failure is an outcome,
  never a crash of the dispatcher.
- An ordered queue runs one call at a time, in order; a failing head blocks it until it
  succeeds or goes to the dead letters.
- A call that was running when the process died (crashes > 0) runs alone in its queue until it
  succeeds: when a poison call kills the process, the calls that happened to run beside it are
  charged one crash but can never be charged a second, so only the culprit reaches max_crashes.
- Worker threads wake the event loop once per batch of results, not once per call.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import inspect
import logging
import operator
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from pmq._calls import StoredCall
from pmq._codec import pack_arguments, unpack_arguments
from pmq._config import QueuePolicy
from pmq._loops import running_loop
from pmq._names import check_cage_name, check_identifier
from pmq.errors import JournalFailed, Reject, Retry
from pmq.store import Store

__all__ = ["CallInfo", "Dispatcher", "Registry", "current_call", "serve_request"]

log = logging.getLogger("pmq.dispatch")

BATCH_CALLS = 512  # calls started per round (one ATTEMPT record and fsync)
# ... while this process is making calls: callers wait for execute() to return and handlers wait
# for nobody, so when both compete for the GIL, making calls goes first and the queue absorbs
# the difference (docs/decisions.md, "Callers before handlers").
CALLING_BATCH_CALLS = 64
# ... and its ATTEMPT record waits this long before asking for an fsync of its own: the callers'
# next commit most likely carries it, so a lone caller pays one fsync per call instead of taking
# turns with the dispatcher's.
CALLING_SYNC_DELAY_S = 0.001
DONE_SYNC_DELAY_S = 0.001  # outcomes wait this long for another commit to carry them
QUICK_HANDLER_SECONDS = 0.0005  # below this mean duration one worker runs a whole batch
SAMPLE_MAX_SECONDS = 2 * QUICK_HANDLER_SECONDS  # a longer handler counts as this long
# A worker reports the outcomes of quick handlers in batches of up to this (and whenever it runs
# out of calls): as many as a round starts. Batches of 64 cost a receiving cage 6% more CPU per
# call than whole rounds (a settle, a DONE record and a round per batch), measured between two
# cage processes; a call alone is still reported as soon as it returns.
REPORT_CALLS = BATCH_CALLS
# While jobs wait and none has started for this long, another worker is woken: twice Python's
# switch interval, so a quick worker that merely waited for the GIL is not taken for stuck.
WAKE_MORE_SECONDS = 0.010


_tuple_new = tuple.__new__
_IS_ASYNC = operator.attrgetter("is_async")


class CallInfo(NamedTuple):
    """What a handler may know about the call it is running (``pmq.current_call()``)."""

    call_id: str
    user_id: str | None
    attempt: int  # 1 for the first attempt
    created: float  # when the call was made (seconds since the epoch)
    first_attempt: float  # when its first attempt started in this process' knowledge
    deadline: float | None
    source: str
    queue: str


# A handler's call: its _Run (the CallInfo is built only if the handler asks), or a CallInfo.
_current: contextvars.ContextVar[Any] = contextvars.ContextVar("pmq_current_call", default=None)
_current_cage: contextvars.ContextVar[Any] = contextvars.ContextVar("pmq_current_cage",
                                                                    default=None)


def current_call() -> CallInfo | None:
    """The call this handler is running, or None outside a handler."""
    current = _current.get()
    if current is None or type(current) is CallInfo:
        return current
    # A _Run: its CallInfo is made when first asked for (most handlers never ask, and a few
    # hundred nanoseconds per call show at 100,000 calls a second), here rather than in a
    # property of _Run, whose call cost another 70 ns. tuple.__new__ skips the NamedTuple's
    # Python-level __new__ (half a µs a call).
    info = current._info
    if info is None:
        info = current._info = _tuple_new(CallInfo, (
            current.call_id, current.user_id, current.attempt, current.created, current.first,
            current.deadline, current.source, current.queue))
    return info  # type: ignore[no-any-return]


def current_cage() -> Any:
    """The cage running the current handler, or None outside a handler."""
    return _current_cage.get()


class Registry:
    """The objects a cage exposes, by module name; only their public callables are callable."""

    def __init__(self) -> None:
        self._modules: dict[str, object] = {}
        self._audience: dict[str, frozenset[str] | None] = {}  # module -> cages that may call it
        self._resolved: dict[tuple[str, str], tuple[Callable[..., Any], bool] | None] = {}

    def expose(self, name: str, obj: object, to: Iterable[str] | None = None) -> None:
        """Make `obj`'s public callables callable as `name.<method>`, by the cages named in
        `to` only when it is given (this cage itself may always call them).

        Raises:
            ValueError: `name` is not a valid module name or is already exposed.
        """
        check_identifier("module", name)
        if name in self._modules:
            raise ValueError(f"module {name!r} is already exposed")
        if isinstance(to, str):
            raise TypeError(f"to= takes a list of cage names, not the str {to!r}")
        self._modules[name] = obj
        self._audience[name] = frozenset(check_cage_name(c) for c in to) if to is not None else None
        self._resolved.clear()

    def refusal(self, source: str, module: str, method: str, cage: str) -> str | None:
        """Why cage `source` may not call `module.method` on cage `cage`, or None if it may."""
        if self.resolve(module, method) is None:
            exposed = ", ".join(self.names()) or "none"
            return (f"{module}.{method} is not exposed by cage {cage} (exposed modules: "
                    f"{exposed})")
        audience = self._audience.get(module)
        if audience is not None and source not in audience and source != cage:
            return f"cage {cage} does not expose {module} to cage {source}"
        return None

    def resolve(self, module: str, method: str) -> tuple[Callable[..., Any], bool] | None:
        """(handler, is it ``async def``) for `module.method`, or None when it is not exposed."""
        try:
            return self._resolved[(module, method)]
        except KeyError:
            pass
        obj = self._modules.get(module)
        found: tuple[Callable[..., Any], bool] | None = None
        if obj is not None and not method.startswith("_"):
            handler = getattr(obj, method, None)
            if handler is not None and callable(handler) and not inspect.isclass(handler):
                found = (handler, inspect.iscoroutinefunction(handler))
        if len(self._resolved) < 10_000:
            self._resolved[(module, method)] = found
        return found

    def names(self) -> list[str]:
        return sorted(self._modules)


class _Run(StoredCall):
    """A call taken to run, and its current attempt, from its start to its outcome.

    The store makes these directly (``Store.take(..., kind=_Run)``), so running a call costs no
    object beside the call itself. The same object lives through the call's retries in this
    process; ``_prepare`` sets what belongs to one attempt. The worker sets `outcome` ("done",
    "failed", "retry" or "reject"; "unsynced" when its ATTEMPT record could not be made durable
    and it did not run) before reporting, and _classify sets `error` and `retry_after` for
    "failed", "retry" and "reject".
    """

    __slots__ = ("_info", "error", "first", "handler", "is_async", "outcome", "retry_after")

    handler: Callable[..., Any]
    is_async: bool
    first: float  # when the call's first attempt started
    outcome: str
    error: str
    retry_after: float | None
    _info: CallInfo | None  # current_call() makes it when first asked for


class _QueueState:
    __slots__ = ("held", "name", "policy", "running", "suspect_running", "suspects")

    def __init__(self, name: str, policy: QueuePolicy) -> None:
        self.name = name
        self.policy = policy
        self.running = 0  # attempts started and not finished
        self.held = 0  # calls waiting for a retry (an ordered queue waits for them)
        self.suspects: deque[_Run] = deque()  # crashed before: each runs alone
        self.suspect_running = False


class _IdleWorkers:
    """The workers waiting for jobs, woken latest first.

    threading.Condition wakes the worker that has waited longest, so a stream of batches
    rotated through every worker of the pool; waking the one that went idle last keeps one
    worker busy (its stack and the handlers' objects still in the CPU's cache) and the rest
    asleep, as a pool of one would: between two cage processes that had run 5% more calls a
    second than the rotating pool of 16.
    """

    __slots__ = ("_lock", "_sleeping", "stopped")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sleeping: list[threading.Lock] = []  # each a worker's lock, held until woken
        self.stopped = False  # the workers are to return once no job is left

    def sleep(self, wake: threading.Lock, jobs: deque[Any]) -> None:
        """Block the calling worker until woken, unless jobs are waiting or the workers stop.

        `wake` is the worker's own lock, held (acquired) while it runs. Jobs are appended
        before ``wake()`` is called, so a worker that finds none here, under the lock, is on
        the list before that call looks at it.
        """
        with self._lock:
            if jobs or self.stopped:
                return
            self._sleeping.append(wake)
        wake.acquire()

    def wake(self, count: int) -> None:
        with self._lock:
            for _ in range(min(count, len(self._sleeping))):
                self._sleeping.pop().release()

    def stop(self) -> None:
        """Wake every worker, for good."""
        with self._lock:
            self.stopped = True
            while self._sleeping:
                self._sleeping.pop().release()


class Dispatcher:
    """Takes calls from the store's local queues and runs them.

    Args:
        store: the cage's store.
        registry: the exposed objects.
        policy: the QueuePolicy of a queue name.
        cage: the Cage, made reachable to handlers through ``pmq.execute``.
        workers: threads that run plain (non-async) handlers.
    """

    def __init__(self, store: Store, registry: Registry, policy: Callable[[str], QueuePolicy],
                 cage: Any, workers: int = 16) -> None:
        self.store = store
        self.registry = registry
        self._policy = policy
        self._cage = cage
        self._workers = workers
        self._queues: dict[str, _QueueState] = {}
        self._retries: list[tuple[float, int, _Run]] = []  # (due, key, call) heap
        self._first_attempt: dict[int, float] = {}
        self._jobs: deque[_Run] = deque()  # plain handlers waiting for a worker
        # The seq of the latest ATTEMPT record of jobs handed to workers unsynced: a worker
        # makes it durable (journal.sync, without the GIL) before it runs a job.
        self._attempts_seq = 0
        self._journal_error: BaseException | None = None  # a worker's sync failed
        self._idle = _IdleWorkers()
        self._handler_seconds = 0.0  # moving mean of plain handlers' duration
        self.counters_buried = 0
        self._woke_more = 0.0  # when the run loop last looked at waiting jobs
        self._jobs_total = 0  # jobs ever queued for workers
        self._jobs_started = 0  # of them, taken by a worker at that last look
        self._results: list[_Run] = []
        self._results_lock = threading.Lock()
        self._signalled = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._random = random.Random()
        self._enqueued = 0  # the store's count of calls made, at the previous round
        self._calling = False  # calls were made in this process since the previous round
        self._done_seq = 0  # the seq of the latest outcomes recorded
        self._done_sync_due = False  # _sync_done is scheduled
        self.counters = dict.fromkeys(("executed", "failed", "retried", "rejected", "expired",
                                       "not_exposed", "too_many_attempts", "crashed"), 0)

    # ---- waking the loop -----------------------------------------------------------------

    def notify(self) -> None:
        """New calls may be ready (thread-safe; coalesces wake-ups)."""
        with self._results_lock:
            first = not self._signalled
            self._signalled = True
        if first:
            self._wake_loop()

    def _report(self, run: _Run) -> None:
        """Called by a worker thread or a task when an attempt has an outcome."""
        with self._results_lock:
            self._results.append(run)
            first = not self._signalled
            self._signalled = True
        if first:
            self._wake_loop()

    def _report_many(self, runs: list[_Run]) -> None:
        """``_report`` for a worker's batch of quick handlers: one lock, one wake-up."""
        with self._results_lock:
            self._results += runs
            first = not self._signalled
            self._signalled = True
        if first:
            self._wake_loop()

    def _wake_loop(self) -> None:
        loop = self._loop
        if loop is None or self._wake is None:
            return
        if _running_loop() is loop:
            self._wake.set()
        else:
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # the loop is closed: the cage is stopping

    # ---- the main loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until stop() is called and nothing is running."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"pmq-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            while True:
                self._wake.clear()
                with self._results_lock:
                    self._signalled = False
                    results, self._results = self._results, []
                if results:
                    self._settle(results)
                if self._journal_error is not None:
                    raise self._journal_error  # the cage stops running calls (cage._task_done)
                if self._stopping:
                    if not any(q.running for q in self._queues.values()):
                        break
                else:
                    started = await self._start_ready()
                    if started:
                        continue
                timeout = None
                if self._retries and not self._stopping:
                    timeout = max(0.0, self._retries[0][0] - time.monotonic())
                if self._jobs:
                    # Calls are waiting for a worker: when no call started in the last
                    # WAKE_MORE_SECONDS, the workers are all inside slow handlers; wake one
                    # more, so slow handlers spread over the pool. Workers that did start calls
                    # are making progress (quick handlers, however long they waited for the
                    # GIL), and another would only fight them for it.
                    now = time.monotonic()
                    if now - self._woke_more >= WAKE_MORE_SECONDS:
                        started = self._jobs_total - len(self._jobs)
                        if started == self._jobs_started:
                            self._idle.wake(1)
                        self._jobs_started = started
                        self._woke_more = now
                    timeout = WAKE_MORE_SECONDS if timeout is None else min(timeout,
                                                                           WAKE_MORE_SECONDS)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            self._idle.stop()
            waiting = [entry[2] for entry in self._retries]
            for state in self._queues.values():
                waiting += state.suspects
                state.suspects.clear()
            self.store.give_back(waiting)
            self._retries = []

    def stop(self) -> None:
        """Start no new attempts; run() returns once running handlers have finished."""
        self._stopping = True
        self.notify()
        if self._wake is not None and _running_loop() is self._loop:
            self._wake.set()

    def _state(self, name: str) -> _QueueState:
        state = self._queues.get(name)
        if state is None:
            state = self._queues[name] = _QueueState(name, self._policy(name))
        return state

    async def _start_ready(self) -> int:
        """Start what may start; return how many calls were started or buried (progress)."""
        now = time.monotonic()
        runs: list[_Run] = []
        buried = self.counters_buried
        enqueued = self.store.counters["enqueued"]
        self._calling = enqueued != self._enqueued
        budget = CALLING_BATCH_CALLS if self._calling else BATCH_CALLS
        self._enqueued = enqueued
        wall = time.time()
        while self._retries and self._retries[0][0] <= now:
            _, _, call = heapq.heappop(self._retries)
            state = self._state(call.queue)
            state.held -= 1
            if call.crashes:
                state.suspects.append(call)
            else:
                self._prepare(call, state, wall, runs)
        for name in self.store.queue_names(outbound=False):
            state = self._state(name)
            if state.suspect_running:
                continue
            if state.policy.ordered:
                room = 0 if state.running or state.held else 1
            else:
                room = state.policy.concurrency - state.running
            room = min(room, budget - len(runs))
            if room <= 0:
                continue
            if not state.suspects:
                # Also calls not yet durable: their ATTEMPT record, durable before any of them
                # runs, comes after them in the journal.
                taken = self.store.take(name, room, kind=_Run, appended=True)
                self._prepare_taken(taken, state, wall, runs)
            while state.suspects and state.running == 0 and not state.suspect_running:
                suspect = state.suspects.popleft()
                before = len(runs)
                self._prepare(suspect, state, wall, runs)  # may bury it: then the next
                state.suspect_running = len(runs) > before
        if not runs:
            return self.counters_buried - buried
        seq = self.store.begin_attempts(runs)
        plain = len(runs) - sum(map(_IS_ASYNC, runs))
        if self._calling or plain < len(runs):
            if self._calling:
                await asyncio.sleep(CALLING_SYNC_DELAY_S)  # a caller's commit may carry it
            await self.store.journal.sync_async(seq)  # the attempt is on disk before it runs
        else:
            # Plain handlers only: the worker that takes the first of them commits the ATTEMPT
            # record itself, off the GIL, and this loop goes on at once. Waiting here cost a
            # wake-up of this thread per round (the flusher's) before the worker's, and kept
            # the next round from being prepared meanwhile.
            self._attempts_seq = seq
        if plain == len(runs):
            self._jobs += runs
        else:
            for run in runs:
                if run.is_async:
                    context = contextvars.copy_context()
                    context.run(self._enter, run)
                    self._loop.create_task(self._run_async(run), context=context)  # type: ignore[union-attr]
                else:
                    self._jobs.append(run)
        self._jobs_total += plain
        if plain:
            # A worker runs calls until the deque is empty: a batch of quick handlers is one
            # wake-up, not a thread switch per call. Slow handlers get a worker each (and the
            # run loop wakes more while jobs keep waiting).
            quick = self._handler_seconds < QUICK_HANDLER_SECONDS
            self._idle.wake(1 if quick else min(plain, self._workers))
        return len(runs)

    def _prepare_taken(self, calls: list[_Run], state: _QueueState, wall: float,
                       runs: list[_Run]) -> None:
        """``_prepare`` for calls just taken from `state`'s queue, or park them as suspects.

        The usual call, a first attempt of an exposed method with no deadline passed and no
        crash, is prepared in this loop, its handler looked up once per method: 0.07 µs per
        call against 0.24 µs for a call of _prepare each (one thread, rounds of 512).
        """
        max_crashes = state.policy.max_crashes
        module = method = None
        handler: Callable[..., Any] | None = None
        is_async = False
        suspects = state.suspects
        started = 0
        for call in calls:
            if call.crashes:
                suspects.append(call)
                continue
            deadline = call.deadline
            if call.attempt or (deadline is not None and wall > deadline) or max_crashes <= 0:
                self._prepare(call, state, wall, runs)
                continue
            if call.module != module or call.method != method:
                resolved = self.registry.resolve(call.module, call.method)
                if resolved is None:
                    module = None
                    self._prepare(call, state, wall, runs)  # buries it: not exposed
                    continue
                module, method = call.module, call.method
                handler, is_async = resolved
            assert handler is not None
            call.first = wall
            call.handler = handler
            call.is_async = is_async
            call._info = None
            runs.append(call)
            started += 1
        state.running += started

    def _prepare(self, call: _Run, state: _QueueState, wall: float, runs: list[_Run]) -> None:
        """Check a call that is about to run (`state` is its queue's, `wall` the round's
        time.time()); bury it instead when it must not run."""
        policy = state.policy
        if call.deadline is not None and wall > call.deadline:
            self._bury(call, "expired", "its deadline passed before it could run")
            self.counters["expired"] += 1
            return
        if call.crashes >= policy.max_crashes:
            self._bury(call, "crashed",
                       f"the process died during {call.crashes} of its attempts (max_crashes "
                       f"{policy.max_crashes})")
            self.counters["crashed"] += 1
            return
        resolved = self.registry.resolve(call.module, call.method)
        if resolved is None:
            self._bury(call, "not exposed",
                       f"{call.module}.{call.method} is not exposed by this cage "
                       f"(exposed modules: {', '.join(self.registry.names()) or 'none'})")
            self.counters["not_exposed"] += 1
            return
        # Only a call that failed here before has its first attempt's time on record.
        call.first = self._first_attempt.get(call.key, wall) if call.attempt else wall
        call.handler, call.is_async = resolved
        call._info = None
        state.running += 1
        runs.append(call)

    def _enter(self, run: _Run) -> None:
        _current.set(run)
        _current_cage.set(self._cage)

    def _work(self) -> None:
        """A worker thread: run plain handlers, one call at a time, until none are waiting.

        Outcomes of quick handlers are reported in batches (up to REPORT_CALLS, and always
        before the worker waits for more), so a batch of them costs one lock and one wake-up of
        the event loop; a slow handler's outcome is reported at once.
        """
        jobs = self._jobs
        popleft = jobs.popleft
        idle = self._idle
        wake = threading.Lock()  # this worker's: released to wake it
        wake.acquire()
        finished: list[_Run] = []
        _current_cage.set(self._cage)  # this thread's context: one cage for its whole life
        set_current = _current.set
        perf_counter = time.perf_counter
        mean = self._handler_seconds
        journal = self.store.journal
        synced = 0  # the latest _attempts_seq this worker made durable
        started = perf_counter()
        while True:
            try:
                run = popleft()
            except IndexError:
                if finished:
                    self._handler_seconds = mean
                    self._report_many(finished)
                    finished = []
                set_current(None)
                if idle.stopped:
                    return
                idle.sleep(wake, jobs)
                started = perf_counter()
                continue
            if synced < self._attempts_seq:
                # Read after the pop: the round that handed this call over set it first.
                try:
                    synced = self._sync_attempts(journal)
                except (JournalFailed, ValueError) as exc:  # failed, or closed: not run
                    run.outcome = "unsynced"
                    self._journal_error = exc
                    finished.append(run)
                    continue
                started = perf_counter()
            # Each call's set replaces the previous one's, and the batch's end clears it: a
            # reset per call cost as much as the rest of this loop's bookkeeping.
            set_current(run)
            try:
                args, kwargs = unpack_arguments(run.arguments)
                run.handler(*args, **kwargs)
                run.outcome = "done"
            except BaseException as exc:  # the outcome of the handler, whatever it raised
                _classify(run, exc)
            # One clock reading per call: a call's end is the next one's start (the few steps
            # of this loop between them count as the handler's).
            ended = perf_counter()
            took = ended - started
            started = ended
            mean = _mean_duration(mean, took)
            # The CallInfo a handler asked for goes now, not when its call is settled: a
            # NamedTuple is never untracked, and hundreds waiting made every young collection
            # walk them.
            run._info = None
            finished.append(run)
            if took >= QUICK_HANDLER_SECONDS or len(finished) >= REPORT_CALLS or not jobs:
                self._handler_seconds = mean
                self._report_many(finished)
                finished = []
                started = perf_counter()  # waiting for the lock is not the next handler's

    def _sync_attempts(self, journal: Any) -> int:
        """Make the ATTEMPT records handed to workers durable (the caller is a worker, waiting
        without the GIL, and may lead the commit itself); the seq now known durable."""
        target = self._attempts_seq
        journal.sync(target)
        return target

    async def _run_async(self, run: _Run) -> None:
        try:
            args, kwargs = unpack_arguments(run.arguments)
            await run.handler(*args, **kwargs)
            run.outcome = "done"
        except BaseException as exc:  # the outcome of the handler, whatever it raised
            _classify(run, exc)
        self._report(run)

    def _settle(self, results: list[_Run]) -> None:
        """Record the outcomes of finished attempts: one DONE and one FAIL record per batch.

        A call that goes to the dead letters needs no FAIL record: DEAD closes its attempt.
        """
        done: list[StoredCall] = []
        failed: list[StoredCall] = []
        first_attempt = self._first_attempt
        state = None
        for call in results:
            if state is None or state.name != call.queue:
                state = self._state(call.queue)
            state.running -= 1
            if call.crashes:
                state.suspect_running = False
            if call.outcome == "done":
                done.append(call)
                if first_attempt:
                    first_attempt.pop(call.key, None)
                continue
            if call.outcome == "unsynced":  # not run: the journal failed (run() raises it)
                continue
            if call.outcome == "reject":
                self._bury(call, "rejected", call.error)
                self.counters["rejected"] += 1
                continue
            policy = state.policy
            if call.outcome == "failed":
                self.counters["failed"] += 1
                log.error("call %s (%s.%s) failed on attempt %d:\n%s", call.call_id,
                          call.module, call.method, call.attempt, call.error)
            else:
                self.counters["retried"] += 1
                log.debug("call %s asked to be retried (attempt %d)", call.call_id, call.attempt)
            if policy.max_attempts is not None and call.attempt >= policy.max_attempts:
                self._bury(call, "max attempts",
                           f"{call.attempt} attempts failed (max_attempts "
                           f"{policy.max_attempts}); last error:\n{call.error}")
                self.counters["too_many_attempts"] += 1
                continue
            delay = call.retry_after
            if delay is None:
                delay = policy.retry_delay(call.attempt, self._random)
            if call.deadline is not None and time.time() + delay > call.deadline:
                self._bury(call, "expired", "its deadline passes before the next attempt; "
                           f"last error:\n{call.error}")
                self.counters["expired"] += 1
                continue
            failed.append(call)
            first_attempt.setdefault(call.key, call.first)
            state.held += 1
            heapq.heappush(self._retries, (time.monotonic() + delay, call.key, call))
        if done or failed:
            self._done_seq = self.store.finish(done, failed)
            self.counters["executed"] += len(done)
            # Outcomes need not be durable before anything else happens (a completion lost in
            # a crash runs its call again, DESIGN.md §2), so they wait DONE_SYNC_DELAY_S for a
            # commit that comes anyway: the next round's ATTEMPT, a caller's, an acceptance.
            # Under load that saves an fsync per round; an idle cage syncs them then, rather
            # than keep them in memory until something else is written.
            if not self._done_sync_due:
                self._done_sync_due = True
                self._loop.call_later(DONE_SYNC_DELAY_S, self._sync_done)  # type: ignore[union-attr]

    def _sync_done(self) -> None:
        """Have the outcomes recorded so far made durable (a no-op when they already are)."""
        self._done_sync_due = False
        journal = self.store.journal
        if journal.closed:  # the cage stopped meanwhile: closing made everything durable
            return
        if journal.durable_seq < self._done_seq:
            journal.sync_async(self._done_seq).add_done_callback(_consume)

    def _bury(self, call: StoredCall, reason: str, detail: str) -> None:
        self.counters_buried += 1
        self._first_attempt.pop(call.key, None)
        # Logged first: drain() returns the moment the store has buried the call, and whoever
        # waited for that should find the line (a test missed it once, on a loaded machine).
        log.warning("call %s (%s.%s) goes to the dead letters: %s", call.call_id, call.module,
                    call.method, reason)
        self.store.bury(call, reason, detail)


MAX_ERROR_CHARS = 60_000  # of a remote error's message and traceback (the wire's limit is 64 Ki)


async def serve_request(registry: Registry, cage: Any, source: str, module: str, method: str,
                        arguments: bytes
                        ) -> tuple[bool, bytes | None, tuple[str, str, str] | None]:
    """Run a synchronous call from cage `source`: (ok, packed result, (type, message,
    traceback)). Whatever the handler raises becomes the error triple, never an exception here.
    """
    refusal = registry.refusal(source, module, method, getattr(cage, "name", "?"))
    if refusal is not None:
        return False, None, ("pmq.NotExposed", refusal, "")
    resolved = registry.resolve(module, method)
    assert resolved is not None
    handler, is_async = resolved
    info = CallInfo(f"{source}:rpc", None, 1, time.time(), time.time(), None, source, "")
    context = contextvars.copy_context()
    context.run(_current.set, info)
    context.run(_current_cage.set, cage)
    try:
        args, kwargs = unpack_arguments(arguments)
        if is_async:
            result = await asyncio.get_running_loop().create_task(
                handler(*args, **kwargs), context=context)
        else:
            result = await asyncio.get_running_loop().run_in_executor(
                None, lambda: context.run(handler, *args, **kwargs))
        return True, pack_arguments([result], {}), None
    except Exception as exc:  # the outcome of the handler, sent back as RemoteError
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ == "builtins" else \
            f"{kind.__module__}.{kind.__qualname__}"
        text = "".join(traceback.format_exception(exc))
        return False, None, (name, str(exc)[:MAX_ERROR_CHARS], text[-MAX_ERROR_CHARS:])


def _consume(future: asyncio.Future[None]) -> None:
    """Retrieve a fire-and-forget future's outcome (a failed journal is reported elsewhere)."""
    if not future.cancelled():
        future.exception()


def _mean_duration(mean: float, took: float) -> float:
    """The moving mean of plain handlers' duration after one that took `took` seconds.

    A sample counts as at most SAMPLE_MAX_SECONDS: a quick handler that waited for the GIL
    through a full garbage collection or a long stretch of the event loop (10 ms and more)
    otherwise flipped the mean to "slow"; every round then woke all workers, whose fight for
    the GIL kept the samples long, and a third of a receiving cage's throughput was lost for
    good (measured between two cage processes). Handlers that are really slow still make it
    slow within a few calls.
    """
    # A conditional, not min(): this runs per call, and min() cost twice the rest.
    return mean + ((took if took < SAMPLE_MAX_SECONDS else SAMPLE_MAX_SECONDS) - mean) / 16


def _classify(run: _Run, exc: BaseException) -> None:
    if isinstance(exc, Retry):
        run.outcome = "retry"
        run.retry_after = exc.after
        run.error = "pmq.Retry"
    elif isinstance(exc, Reject):
        run.outcome = "reject"
        run.error = exc.reason
    else:
        run.outcome = "failed"
        run.retry_after = None
        run.error = "".join(traceback.format_exception(exc))


_running_loop = running_loop
