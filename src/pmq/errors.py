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
    "RemoteProtocolError",
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
