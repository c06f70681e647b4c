"""What a receiving cage remembers per link: the highest call accepted and the calls refused.

Owns: the state that makes acceptance exactly-once (DESIGN.md §5). A link is one source cage's
journal, named by (source cage name, source journal id): the sender numbers its calls with keys
that only grow within that journal, so "every key up to ``high`` was accepted or refused" is all
a receiver needs to recognise a redelivery, however often the sender reconnects or restarts. A
source that starts again from an empty directory has a new journal id, hence a new link, so its
new calls are never mistaken for old ones. Must not: touch the journal or decide what to accept
(the store appends this state's records in the same frame as the calls they accept).

Invariants:
- ``high`` of a link only grows, and is durable together with the calls it covers (one frame).
- A refusal is kept (durably) until the sender says it has recorded it (``settled``): a sender
  that crashed before recording a refusal learns it again when it reconnects, so a refused call
  always reaches the source's dead letters and is never silently lost.
"""

from __future__ import annotations

from typing import Any

__all__ = ["K_LINK", "Links"]

#: Record kind: [8, source, journal_id, high, [key, reason, ...] newly refused, settled]
K_LINK = 8


class _Link:
    __slots__ = ("high", "refused")

    def __init__(self, high: int = 0, refused: dict[int, str] | None = None) -> None:
        self.high = high
        self.refused: dict[int, str] = refused or {}


class Links:
    """Acceptance state per (source cage, source journal id)."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, bytes], _Link] = {}

    def high(self, source: str, journal_id: bytes) -> int:
        """Every key of this link up to here was accepted or refused."""
        link = self._links.get((source, journal_id))
        return link.high if link is not None else 0

    def refusals(self, source: str, journal_id: bytes) -> list[tuple[int, str]]:
        """Refusals the source has not yet confirmed, oldest first."""
        link = self._links.get((source, journal_id))
        return sorted(link.refused.items()) if link is not None else []

    def prunable(self, source: str, journal_id: bytes, settled: int) -> bool:
        """Whether `settled` lets some kept refusal go."""
        link = self._links.get((source, journal_id))
        return link is not None and any(key <= settled for key in link.refused)

    def record(self, source: str, journal_id: bytes, high: int,
               refused: list[tuple[int, str]], settled: int) -> list[Any]:
        """Apply a step of the link and return the record that makes it durable."""
        flat: list[Any] = []
        for key, reason in refused:
            flat += (key, reason)
        record = [K_LINK, source, journal_id, high, flat, settled]
        self.apply(record)
        return record

    def apply(self, record: list[Any]) -> None:
        """Replay a K_LINK record (recovery) or apply a new one."""
        _, source, journal_id, high, flat, settled = record
        link = self._links.setdefault((source, bytes(journal_id)), _Link())
        link.high = max(link.high, high)
        for key, reason in zip(flat[::2], flat[1::2], strict=True):
            link.refused[key] = reason
        if settled:
            for key in [k for k in link.refused if k <= settled]:
                del link.refused[key]

    def snapshot(self) -> list[list[Any]]:
        return [[source, journal_id, link.high, sorted(link.refused.items())]
                for (source, journal_id), link in self._links.items()]

    def restore(self, state: list[list[Any]]) -> None:
        self._links = {(source, bytes(journal_id)): _Link(high, {k: r for k, r in refused})
                       for source, journal_id, high, refused in state}

    def __len__(self) -> int:
        return len(self._links)
