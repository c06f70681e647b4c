"""What the store keeps per call: the records it appends, and the objects it hands out.

Owns: the kinds of the store's journal records and their layout, the call to store (NewCall),
the call handed out to run or send (StoredCall), the answers about calls (CallStatus,
DeadLetter), the lazily made ids of a batch (CallIds) and the state of one queue. Must not: touch
the journal or hold any store's state (``pmq.store`` does); split from it to keep both readable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, overload

__all__ = ["K_ATTEMPT", "K_CALL", "K_DEAD", "K_DONE", "K_FAIL", "K_PURGE", "K_REVIVE", "CallIds",
           "CallStatus", "DeadLetter", "NewCall", "NewCallFields", "Queue", "StoredCall"]

# Record kinds: the first element of every msgpack array the store appends.
# [1, key, queue, outbound, user_id, module, method, arguments, deadline, created, source]
# and, for a call accepted from another cage, a 12th item: its id on the source cage
K_CALL = 1
K_ATTEMPT = 2  # [2, [key, attempt, key, attempt, ...]]  attempts started
K_FAIL = 3  # [3, [key, attempt, ...]]  attempts that ended without success
K_DONE = 4  # [4, [key, ...], [queue, bytes, ...]]  completed; bytes freed per outbound queue
K_DEAD = 5  # [5, key, queue, outbound, reason, detail, at, argument bytes]
K_REVIVE = 6  # [6, key]  a dead letter goes back to its queue
K_PURGE = 7  # [7, key]  a dead letter is deleted





class NewCall(NamedTuple):
    """A call to store, as the proxy and the codec made it.

    The proxy makes plain tuples in this order (``NewCallFields``), and the store reads them by
    position: the garbage collector stops tracking a plain tuple of plain values but never a
    NamedTuple, and a transaction holds thousands until it commits.
    """

    queue: str  # "loopback_queue" (run here) or "<peer>_queue" (waits for the transport)
    outbound: bool
    module: str
    method: str
    arguments: bytes  # pmq._codec.pack_arguments(args, kwargs)
    user_id: str | None  # the full id (already "<parent>:<id>" inside a handler)
    deadline: float | None  # seconds since the epoch
    source: str  # the cage that made the call


# queue, outbound, module, method, arguments, user_id, deadline, source: a NewCall's fields.
NewCallFields = tuple[str, bool, str, str, bytes, str | None, float | None, str]


class CallIds(Sequence[str]):
    """The automatic ids of calls with consecutive keys, made only when someone reads them.

    A transaction of thousands of calls whose ids nobody asks for then costs no string each.
    """

    __slots__ = ("_count", "_first", "_prefix")

    def __init__(self, prefix: str, first: int, count: int) -> None:
        self._prefix = prefix
        self._first = first
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("call id index out of range")
        return self._prefix + str(self._first + index)

    def __iter__(self) -> Iterator[str]:
        prefix = self._prefix
        return (prefix + key for key in map(str, range(self._first, self._first + self._count)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are not hashable

    def __repr__(self) -> str:
        return repr(list(self))


class StoredCall:
    """A call handed out by ``take``: everything needed to run or send it."""

    __slots__ = ("arguments", "attempt", "attempt_open", "call_id", "crashes", "created",
                 "deadline", "key", "method", "module", "origin", "outbound", "queue", "source",
                 "user_id")

    def __init__(self, key: int, id_prefix: str, fields: Sequence[Any], attempt: int = 0,
                 crashes: int = 0):
        """`fields` is the call's CALL record; `id_prefix` the store's "<cage>:<journal>:",
        which with the key makes the automatic id of a call made here."""
        self.key = key
        # One unpacking of the whole record: a third quicker than slicing it, and it runs per
        # call. The call's id is its user id, else its id on the cage that made it (a 12th
        # item, on calls accepted from a peer and on replayed ones), else the automatic one.
        if len(fields) == 11:
            (_, _, self.queue, self.outbound, user_id, self.module, self.method,
             self.arguments, self.deadline, self.created, self.source) = fields
            self.call_id = id_prefix + str(key) if user_id is None else str(user_id)
            self.origin = None
        else:
            (_, _, self.queue, self.outbound, user_id, self.module, self.method,
             self.arguments, self.deadline, self.created, self.source, origin) = fields[:12]
            self.call_id = str(origin) if user_id is None else str(user_id)
            self.origin = origin  # its id where it was made, when that is not its key here
        self.user_id = user_id
        # While a call is handed out these three are the truth (the store's sparse dicts
        # hold them only for calls that wait): bookkeeping per call costs no dict entry.
        self.attempt = attempt  # attempts started
        self.crashes = crashes
        self.attempt_open = False  # its latest attempt started and has no outcome yet

    def __repr__(self) -> str:
        return f"<StoredCall {self.call_id} {self.module}.{self.method} attempt {self.attempt}>"


class CallStatus(NamedTuple):
    """Where a call is: stored, transmitted, accepted, executed, dead or unknown."""

    state: str
    reason: str | None = None
    attempts: int = 0


class DeadLetter(NamedTuple):
    """A call that will not run again unless replayed."""

    call_id: str
    queue: str
    module: str
    method: str
    reason: str
    detail: str
    at: float
    attempts: int
    source: str


class Queue:
    """The waiting calls of one queue (inbound or outbound), as the store keeps them."""

    __slots__ = ("bytes", "name", "outbound", "pending", "sorted", "taken")

    def __init__(self, name: str, outbound: bool) -> None:
        self.name = name
        self.outbound = outbound
        self.pending: deque[int] = deque()  # keys not handed out; in key order while `sorted`
        self.bytes = 0  # argument bytes of pending outbound calls (max_pending_bytes)
        self.sorted = True
        self.taken = 0  # calls handed out by take and not yet back, finished or buried
