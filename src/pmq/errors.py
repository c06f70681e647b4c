"""Every exception pmq raises, in one tree.

Owns: the exception classes and their meaning. Must not: import anything of pmq's (every
layer imports this module, so it sits below all of them).

Invariants:
- Each class says when it is raised and what the caller should do about it.
- Data errors also subclass the builtin people already catch (``JournalCorruption`` is a
  ``ValueError``, ``TransportError`` a ``ConnectionError``, ``Timeout`` a ``TimeoutError``).
- ``retriable`` says whether the same operation may succeed if simply tried again later.
"""

from __future__ import annotations

import math
from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "JournalCorruption",
    "JournalError",
    "JournalFailed",
    "JournalLocked",
    "LocalProtocolError",
    "PmqError",
    "ProtocolError",
    "QueueFull",
    "Reject",
    "RemoteError",
    "RemoteProtocolError",
    "Retry",
    "StorageFull",
    "Timeout",
    "TransportError",
]


class PmqError(Exception):
    """Base class of every error pmq raises.

    Catch it to handle anything pmq can go wrong with; look at ``retriable`` to decide whether
    trying the same operation again later can help.
    """

    retriable: ClassVar[bool] = False


class JournalError(PmqError):
    """Something is wrong with a journal: its files, its disk or its state."""


class JournalCorruption(JournalError, ValueError):
    """Recovery found damage that a crash cannot explain.

    Raised when opening a journal whose files hold a bad frame that a later frame claims was
    durable, a segment with a bad header, a missing segment or segments from another journal.
    Nothing is changed on disk. Restore the directory from a backup, or open it with
    ``on_corruption="salvage"`` to skip the damaged frames (it reports what it skipped).

    Attributes:
        path: the file that holds the damage.
        offset: the byte offset in that file where the damage starts.
    """

    def __init__(self, message: str, path: str, offset: int) -> None:
        super().__init__(f"{message} ({path} at offset {offset})")
        self.path = path
        self.offset = offset

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_corruption, (self.args[0], self.path, self.offset))


def _rebuild_corruption(full_message: str, path: str, offset: int) -> JournalCorruption:
    error = JournalCorruption.__new__(JournalCorruption)
    Exception.__init__(error, full_message)
    error.path = path
    error.offset = offset
    return error


class JournalFailed(JournalError):
    """A write or an fsync of the journal failed, so the journal refuses all further work.

    After a failed fsync the kernel may already have dropped the unwritten pages, so retrying it
    could report success for data that is gone (PostgreSQL's "fsyncgate"). Everything that was
    acknowledged before the failure is still on disk. Close the journal and open it again (which
    runs full recovery) once the cause (a failing disk, a full file system) is dealt with.
    """


class JournalLocked(JournalError):
    """Another journal object, in this process or another one, has the directory open.

    A journal has exactly one writer. Stop the other process (or close the other object) first.
    """


class StorageFull(JournalError):
    """The disk has no room for the next segment, so this append was not made.

    Nothing acknowledged is lost and the journal stays usable: appends succeed again once space
    is freed (by the application, or by pmq reclaiming completed records).
    """

    retriable: ClassVar[bool] = True


class ProtocolError(PmqError):
    """A connection broke the rules of the pmq wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized or out of order; its connection is closed."""


class TransportError(PmqError, ConnectionError):
    """A peer could not be reached or the connection to it was lost. Trying again may work."""

    retriable: ClassVar[bool] = True


class AuthenticationError(PmqError):
    """A peer failed the handshake: wrong secret, or a certificate that names another cage."""


class Timeout(PmqError, TimeoutError):
    """A synchronous call did not complete within its timeout; it may still run on the target."""


class QueueFull(PmqError):
    """The outbound backlog to a peer is over its ``max_pending`` limit, so this call was refused.

    Raised by a queued ``execute`` when the calls stored for one peer and not yet accepted by it
    number ``max_pending`` or more, or take ``max_pending_bytes`` or more (both are per-queue
    policy). Nothing was stored: the call was not made, and no earlier call was dropped. Slow
    down and try again later (``aexecute`` can wait for room instead of raising), find out why
    the peer does not accept calls (is it running and reachable?), or raise the limits.

    Attributes:
        queue: the queue the call was for, e.g. ``"ledger_queue"``.
        pending: how many calls to that peer were waiting.
        pending_bytes: how many bytes those calls take.
        max_pending, max_pending_bytes: the limits in force, when the raiser gives them.
    """

    retriable: ClassVar[bool] = True

    def __init__(
        self,
        queue: str,
        pending: int,
        pending_bytes: int,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
    ) -> None:
        limits = ""
        if max_pending is not None and max_pending_bytes is not None:
            limits = f" (limits: {max_pending} calls, {max_pending_bytes} bytes)"
        super().__init__(
            f"queue {queue!r} is full: {pending} calls ({pending_bytes} bytes) wait for the peer"
            f"{limits}; nothing was stored, try again later"
        )
        self.queue = queue
        self.pending = pending
        self.pending_bytes = pending_bytes
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes

    def __reduce__(self) -> tuple[object, ...]:
        limits = (self.max_pending, self.max_pending_bytes)
        return (QueueFull, (self.queue, self.pending, self.pending_bytes, *limits))


class RemoteError(PmqError):
    """The target of a synchronous call raised an exception instead of returning.

    Raised by a synchronous ``execute.on("cage")...`` (no ``_queue`` suffix) when the method ran
    on the target and raised. pmq never ships exception objects between processes (that would
    need pickle), so this carries the remote exception's type name, message and formatted
    traceback as text. Look at ``remote_type`` to tell failures apart; the call may or may not
    have had effects on the target before it raised.

    Attributes:
        remote_type: the qualified name of the remote exception's class, e.g. ``"KeyError"`` or
            ``"ledger.accounts.Overdrawn"``.
        message: ``str()`` of the remote exception.
        traceback_text: the remote traceback, formatted (may be empty if the target withholds it).
    """

    def __init__(self, remote_type: str, message: str, traceback_text: str) -> None:
        super().__init__(remote_type, message, traceback_text)
        self.remote_type = remote_type
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.message}"


class Retry(Exception):
    """Raised by a handler to skip this attempt quietly and run the call again later.

    Not an error of pmq, and not a ``PmqError``: a handler raises it to steer its own call, e.g.
    when what it needs is not ready yet. The attempt is not logged as a failure. The call runs
    again after ``after`` seconds, or after the queue's usual backoff delay when ``after`` is
    None. The call still expires at its deadline.

    Attributes:
        after: seconds to wait before the next attempt, or None for the queue's backoff delay.
    """

    def __init__(self, after: float | None = None) -> None:
        if after is not None:
            if isinstance(after, bool) or not isinstance(after, int | float):
                raise TypeError(
                    f"Retry(after=...) must be a number of seconds or None, "
                    f"not {type(after).__name__} ({after!r})"
                )
            if not math.isfinite(after) or after < 0:
                raise ValueError(
                    f"Retry(after=...) must be a finite number of seconds >= 0, got {after!r}"
                )
            after = float(after)
        super().__init__(after)
        self.after: float | None = after

    def __str__(self) -> str:
        if self.after is None:
            return "retry after the queue's backoff delay"
        return f"retry after {self.after:g} s"


class Reject(Exception):
    """Raised by a handler to give up on its call for good: it goes straight to dead letters.

    Not an error of pmq, and not a ``PmqError``: a handler raises it when retrying cannot help
    (the arguments are invalid, the account no longer exists). The call is not retried; it is
    moved to the dead-letter store with ``reason``, where ``pmq dead list|show|replay`` finds it.

    Attributes:
        reason: why the call was rejected, as recorded with the dead letter.
    """

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str):
            raise TypeError(f"Reject(reason) must be a str, not {type(reason).__name__}")
        super().__init__(reason)
        self.reason = reason
