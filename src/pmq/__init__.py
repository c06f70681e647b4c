"""pmq: durable peer-to-peer queued calls between Python processes.

Layout (docs/ and ../DESIGN.md §3): ``_journal`` (compiled write-ahead log) is the bottom layer;
this package re-exports only the public names. The cage API arrives with the store, dispatcher
and transport layers.
"""

from pmq.errors import (
    AuthenticationError,
    JournalCorruption,
    JournalError,
    JournalFailed,
    JournalLocked,
    LocalProtocolError,
    PmqError,
    ProtocolError,
    RemoteProtocolError,
    StorageFull,
    Timeout,
    TransportError,
)

__version__ = "0.1.0.dev0"

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
    "__version__",
]
