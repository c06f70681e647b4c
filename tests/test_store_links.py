"""The receiving side of a link in the store: exactly-once acceptance, refusals, restarts.

What must hold (pmq.store accept/settle_outbound, pmq._links):
- a call at or below the link's high-water key is a redelivery and is not stored again, also
  after a restart of the receiver;
- a new journal of the same source (a new journal id) is a new link;
- refusals are kept until the sender's settled mark passes them;
- a dead letter accepted from another cage without an id= can be replayed by its source id.
"""

from __future__ import annotations

import time
from pathlib import Path

from pmq._codec import pack_arguments
from pmq.protocol import WireCall
from pmq.store import Store

ARGS = pack_arguments((1,), {})
JOURNAL_A = b"a" * 16


def calls(*keys: int, method: str = "f") -> list[WireCall]:
    """Wire calls with these keys, as a sender would send them."""
    return [WireCall(key, "m", method, ARGS, None, None, time.time()) for key in keys]


def allow_f(module: str, method: str) -> str | None:
    """Refuse everything but m.f."""
    return None if method == "f" else f"{module}.{method} is not exposed"


def test_redelivered_calls_are_stored_once_even_across_a_restart(tmp_path: Path) -> None:
    """Keys at or below the high-water mark are dropped, before and after reopening."""
    store = Store(str(tmp_path), "b")
    seq, high, refused = store.accept("a", JOURNAL_A, calls(1, 2, 3), 0, allow_f)
    assert (high, refused) == (3, []) and seq
    assert store.accept("a", JOURNAL_A, calls(2, 3), 0, allow_f)[:2] == (0, 3)
    store.journal.sync()
    store.close()
    store = Store(str(tmp_path), "b")
    assert store.link_state("a", JOURNAL_A) == (3, [])
    store.accept("a", JOURNAL_A, calls(3, 4), 0, allow_f)
    assert store.pending("a_queue") == 4
    store.journal.sync()  # take hands out only what is durable
    taken = store.take("a_queue", 10)
    assert [c.call_id for c in taken] == [f"a:{JOURNAL_A.hex()[:8]}:{k}" for k in (1, 2, 3, 4)]
    store.close()


def test_a_new_journal_of_the_same_source_is_a_new_link(tmp_path: Path) -> None:
    """A source that starts from an empty directory has new keys that are not redeliveries."""
    store = Store(str(tmp_path), "b")
    store.accept("a", JOURNAL_A, calls(1, 2), 0, allow_f)
    store.accept("a", b"z" * 16, calls(1, 2), 0, allow_f)
    assert store.pending("a_queue") == 4
    store.close()


def test_refusals_are_kept_until_the_sender_has_settled_them(tmp_path: Path) -> None:
    """A refused call is acknowledged with its reason until settled passes its key."""
    store = Store(str(tmp_path), "b")
    _, high, refused = store.accept("a", JOURNAL_A, calls(1) + calls(2, method="g"), 0, allow_f)
    assert high == 2 and refused == [(2, "m.g is not exposed")]
    store.journal.sync()
    store.close()
    store = Store(str(tmp_path), "b")
    assert store.link_state("a", JOURNAL_A) == (2, [(2, "m.g is not exposed")])
    store.accept("a", JOURNAL_A, calls(3), 2, allow_f)
    assert store.link_state("a", JOURNAL_A) == (3, [])
    assert store.pending("a_queue") == 2
    store.close()


def test_a_dead_letter_from_another_cage_is_found_by_its_source_id(tmp_path: Path) -> None:
    """replay and purge take the id the source gave the call, with or without source=."""
    store = Store(str(tmp_path), "b")
    store.accept("a", JOURNAL_A, calls(7, 8), 0, allow_f)
    store.journal.sync()
    for call in store.take("a_queue", 2):
        store.bury(call, "rejected", "no")
    first, second = (f"a:{JOURNAL_A.hex()[:8]}:{k}" for k in (7, 8))
    assert [d.call_id for d in store.dead_letters()] == [first, second]
    store.revive(first)
    store.purge(second, source="a")
    store.journal.sync()
    assert store.dead_letters() == []
    assert [c.call_id for c in store.take("a_queue", 5)] == [first]
    store.close()


def test_calls_from_a_peer_are_found_by_their_id_there_pending_taken_executed(
    tmp_path: Path,
) -> None:
    """status(id on the source) is "accepted" while the call waits (also in a backlog read back
    after a restart) or runs, "executed" once done, "unknown" for a key never accepted."""
    prefix = f"a:{JOURNAL_A.hex()[:8]}:"
    wire_keys = list(range(3, 3000, 3))  # a source's keys have gaps (its other records)
    store = Store(str(tmp_path), "b")
    for start in range(0, len(wire_keys), 100):
        store.accept("a", JOURNAL_A, calls(*wire_keys[start:start + 100]), 0, allow_f)
    store.journal.sync()
    for key in (3, 1500, 2997, wire_keys[517]):
        assert store.status(prefix + str(key)).state == "accepted", key
    for key in (1, 4, 1501, 3000, 99_999):
        assert store.status(prefix + str(key)).state == "unknown", key
    assert store.status(f"c:{JOURNAL_A.hex()[:8]}:3").state == "unknown"  # no such source

    taken = store.take("a_queue", 10)
    store.journal.sync(store.begin_attempts(taken))
    assert store.status(prefix + "3") == ("accepted", None, 1)
    store.finish(taken[:5], [])
    assert store.status(prefix + "3").state == "executed"
    assert store.status(prefix + "18").state == "accepted"  # taken, not finished
    store.close()  # gives the taken calls back; the backlog is read back from the journal

    store = Store(str(tmp_path), "b")
    assert store.status(prefix + "18").state == "accepted"
    assert store.status(prefix + "2001").state == "accepted"
    assert store.status(prefix + "2002").state == "unknown"
    # A second journal of the same source (a new data directory there): both are found.
    store.accept("a", b"z" * 16, calls(5, 6), 0, allow_f)
    store.journal.sync()
    assert store.status(f"a:{(b'z' * 16).hex()[:8]}:6").state == "accepted"
    assert store.status(prefix + "2001").state == "accepted"
    store.close()


def test_a_dead_letter_from_a_peer_is_reported_dead_by_its_id_there(tmp_path: Path) -> None:
    """A call b buried (its handler rejected it) is "dead" with the reason, by a's id."""
    store = Store(str(tmp_path), "b")
    store.accept("a", JOURNAL_A, calls(7), 0, allow_f)
    store.journal.sync()
    [call] = store.take("a_queue", 1)
    store.bury(call, "rejected", "not today")
    assert store.status(f"a:{JOURNAL_A.hex()[:8]}:7")[:2] == ("dead", "rejected")
    store.close()
