"""pmq: durable peer-to-peer queued calls between Python processes.

Layers (DESIGN.md §3), each importing only those below it: ``_journal`` (the compiled
write-ahead log), ``store`` (queue state), ``dispatch`` (running calls), ``proxy`` and ``cage``
(what users see). This module only re-exports the public names.
"""

from pmq._calls import CallStatus, DeadLetter
from pmq._config import QueuePolicy
from pmq.cage import Cage, Transaction, aexecute, execute
from pmq.dispatch import CallInfo, current_call
from pmq.errors import (
    AuthenticationError,
    JournalCorruption,
    JournalError,
    JournalFailed,
    JournalLocked,
    LocalProtocolError,
    PmqError,
    ProtocolError,
    QueueFull,
    Reject,
    RemoteError,
    RemoteProtocolError,
    Retry,
    StorageFull,
    Timeout,
    TransportError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AuthenticationError",
    "Cage",
    "CallInfo",
    "CallStatus",
    "DeadLetter",
    "JournalCorruption",
    "JournalError",
    "JournalFailed",
    "JournalLocked",
    "LocalProtocolError",
    "PmqError",
    "ProtocolError",
    "QueueFull",
    "QueuePolicy",
    "Reject",
    "RemoteError",
    "RemoteProtocolError",
    "Retry",
    "StorageFull",
    "Timeout",
    "Transaction",
    "TransportError",
    "__version__",
    "aexecute",
    "current_call",
    "execute",
]
