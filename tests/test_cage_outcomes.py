"""The local cage: outcomes, dead letters, transactions and user ids.

Checks DESIGN.md §2's outcomes: what a failure, ``Retry``, ``Reject``, a deadline or a limit
does to a call, that dead letters can be inspected, replayed and purged, that a transaction is
one frame or nothing, and that a user id is accepted once within the retention window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pmq
from helpers import FAST_RETRY, LIMIT_S, Log, next_seq, wait_until

# ---- outcomes: retries, Retry, Reject, deadlines, dead letters -------------------------------


def test_failing_handler_is_retried_with_growing_attempt(
    make_cage: Callable[..., pmq.Cage], caplog: pytest.LogCaptureFixture
) -> None:
    """An exception is retried with backoff; current_call().attempt counts 1, 2, 3; then done."""
    log = Log()

    class Mod:
        def f(self) -> None:
            attempt = pmq.current_call().attempt  # type: ignore[union-attr]
            log.add(attempt)
            if attempt < 3:
                raise ValueError(f"failure {attempt}")

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": FAST_RETRY})
    with caplog.at_level(logging.ERROR, logger="pmq"):
        call_id = cage.execute.on("loopback_queue").mod.f()
        cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2, 3]
    assert cage.call_status(call_id).state == "executed"
    assert cage.dead_letters() == []
    failures = [r for r in caplog.records
                if r.name == "pmq.dispatch" and r.levelno >= logging.ERROR]
    assert len(failures) == 2 and "failure 1" in failures[0].getMessage()


def test_retry_skips_the_attempt_quietly(
    make_cage: Callable[..., pmq.Cage], caplog: pytest.LogCaptureFixture
) -> None:
    """``raise pmq.Retry(after=0.01)`` runs the call again, attempt + 1, logging no error."""
    log = Log()

    class Mod:
        def f(self) -> None:
            attempt = pmq.current_call().attempt  # type: ignore[union-attr]
            log.add(attempt)
            if attempt < 3:
                raise pmq.Retry(after=0.01)

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": {"retry_initial": 3600.0,
                                                                         "retry_max": 3600.0}})
    with caplog.at_level(logging.DEBUG, logger="pmq"):
        cage.execute.on("loopback_queue").mod.f()
        cage.drain(timeout=LIMIT_S)  # after= overrides the hour-long backoff
    assert log.items == [1, 2, 3]
    assert not [r for r in caplog.records
                if r.name.startswith("pmq") and r.levelno >= logging.WARNING]
    assert cage.stats()["dispatch"]["retried"] == 2


def test_retry_counts_against_max_attempts(make_cage: Callable[..., pmq.Cage]) -> None:
    """Retry counts as an attempt (docs/decisions.md): max_attempts still bounds it."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise pmq.Retry(after=0)

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": {"max_attempts": 2}})
    call_id = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2]
    assert cage.call_status(call_id) == pmq.CallStatus("dead", "max attempts", 2)


def test_reject_sends_the_call_to_the_dead_letters(make_cage: Callable[..., pmq.Cage]) -> None:
    """``raise pmq.Reject("why")`` buries the call at once with reason "rejected" and the why."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)
            raise pmq.Reject("account 42 is closed")

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": FAST_RETRY})
    call_id = cage.execute.on("loopback_queue").mod.f(42)
    cage.drain(timeout=LIMIT_S)
    assert log.items == [42]  # not retried
    [letter] = cage.dead_letters()
    assert isinstance(letter, pmq.DeadLetter)
    assert (letter.call_id, letter.queue, letter.module, letter.method) == (
        call_id, "loopback_queue", "mod", "f")
    assert letter.reason == "rejected" and letter.detail == "account 42 is closed"
    assert letter.attempts == 1
    assert cage.call_status(call_id) == pmq.CallStatus("dead", "rejected", 1)


@pytest.mark.parametrize("what", ["module", "method"])
def test_call_to_something_not_exposed_is_buried(
    make_cage: Callable[..., pmq.Cage], what: str
) -> None:
    """A call to a module or method the cage does not expose goes to dead letters "not exposed"."""

    class Mod:
        def f(self) -> None:
            pass

    cage = make_cage(expose={"mod": Mod()})
    target = cage.execute.on("loopback_queue")
    call_id = target.nomod.f() if what == "module" else target.mod.nomethod()
    cage.drain(timeout=LIMIT_S)
    [letter] = cage.dead_letters()
    assert letter.call_id == call_id and letter.reason == "not exposed"
    assert "not exposed" in letter.detail
    assert cage.call_status(call_id).reason == "not exposed"


def test_call_whose_deadline_passes_is_buried_expired(
    make_cage: Callable[..., pmq.Cage], caplog: pytest.LogCaptureFixture
) -> None:
    """A call with expires_in whose handler always fails goes to dead letters "expired", logged."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise RuntimeError("never works")

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": FAST_RETRY})
    with caplog.at_level(logging.WARNING, logger="pmq"):
        call_id = cage.execute.on("loopback_queue", expires_in=0.3).mod.f()
        cage.drain(timeout=LIMIT_S)
    assert cage.call_status(call_id).state == "dead"
    [letter] = cage.dead_letters()
    assert letter.reason == "expired"
    assert letter.attempts == len(log.items)
    assert any("expired" in r.getMessage() and call_id in r.getMessage() for r in caplog.records)


def test_max_attempts_buries_after_exactly_that_many(make_cage: Callable[..., pmq.Cage]) -> None:
    """With max_attempts=3 a failing call runs exactly 3 times, then is dead "max attempts"."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise KeyError("missing")

    cage = make_cage(expose={"mod": Mod()},
                     queues={"loopback_queue": {**FAST_RETRY, "max_attempts": 3}})
    call_id = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2, 3]
    [letter] = cage.dead_letters()
    assert letter.reason == "max attempts" and letter.attempts == 3
    assert "KeyError" in letter.detail
    assert cage.call_status(call_id) == pmq.CallStatus("dead", "max attempts", 3)


def test_replay_runs_a_dead_letter_again_with_attempts_reset(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """replay(call_id) sends a dead letter back to its queue; it runs again from attempt 1."""
    log = Log()
    broken = True

    class Mod:
        def f(self, x: int) -> None:
            log.add((x, pmq.current_call().attempt))  # type: ignore[union-attr]
            if broken:
                raise RuntimeError("broken")

    cage = make_cage(expose={"mod": Mod()},
                     queues={"loopback_queue": {**FAST_RETRY, "max_attempts": 2}})
    call_id = cage.execute.on("loopback_queue").mod.f(7)
    cage.drain(timeout=LIMIT_S)
    assert cage.call_status(call_id).state == "dead"
    broken = False
    cage.replay(call_id)
    cage.drain(timeout=LIMIT_S)
    assert log.items == [(7, 1), (7, 2), (7, 1)]
    assert cage.dead_letters() == []
    assert cage.call_status(call_id).state == "executed"
    assert cage.stats()["counters"]["revived"] == 1


def test_purge_deletes_a_dead_letter_for_good(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """purge(call_id) removes a dead letter for good (also after a restart); status is unknown."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().call_id)  # type: ignore[union-attr]
            raise pmq.Reject("no")

    cage = make_cage(expose={"mod": Mod()})
    auto_id = cage.execute.on("loopback_queue").mod.f()
    user_id = cage.execute.on("loopback_queue", id="drop-me").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert {letter.call_id for letter in cage.dead_letters()} == {auto_id, user_id}
    cage.purge(auto_id)
    assert [letter.call_id for letter in cage.dead_letters()] == [user_id]
    assert cage.call_status(auto_id).state == "unknown"
    cage.purge(user_id)
    assert cage.dead_letters() == []
    for call_id in (auto_id, user_id):
        with pytest.raises(KeyError):
            cage.replay(call_id)
        with pytest.raises(KeyError):
            cage.purge(call_id)
    cage.stop()
    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Mod()})
    again.drain(timeout=LIMIT_S)
    assert again.dead_letters() == []
    assert sorted(log.items) == sorted([auto_id, user_id])  # neither ran again
    assert again.call_status(auto_id).state == "unknown"  # (user ids: the test below)


def test_status_of_a_purged_call_with_a_user_id_is_unknown(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """A purged dead letter made with id= is "unknown", not "executed": it never ran to success."""

    class Mod:
        def f(self) -> None:
            raise pmq.Reject("no")

    cage = make_cage(expose={"mod": Mod()})
    call_id = cage.execute.on("loopback_queue", id="drop-me").mod.f()
    cage.drain(timeout=LIMIT_S)
    cage.purge(call_id)
    assert cage.call_status(call_id).state == "unknown"


def test_replay_or_purge_of_a_call_that_is_not_dead_raises_key_error(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """replay and purge of an unknown or completed call raise KeyError."""

    class Mod:
        def f(self) -> None:
            pass

    cage = make_cage(expose={"mod": Mod()})
    done = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    for call_id in (done, "solo:00000000:999", "never-made"):
        with pytest.raises(KeyError):
            cage.replay(call_id)
        with pytest.raises(KeyError):
            cage.purge(call_id)


def test_call_status_follows_a_call(make_cage: Callable[..., pmq.Cage]) -> None:
    """call_status: accepted while pending or running, executed after, dead, unknown, stored."""
    release = threading.Event()
    running = threading.Event()

    class Mod:
        def hold(self) -> None:
            running.set()
            assert release.wait(LIMIT_S)

        def quick(self) -> None:
            pass

        def refuse(self) -> None:
            raise pmq.Reject("refused")

    cage = make_cage(expose={"mod": Mod()}, peers={"ledger": "127.0.0.1:1"},
                     queues={"loopback_queue": {"ordered": True}})
    held = cage.execute.on("loopback_queue").mod.hold()
    behind = cage.execute.on("loopback_queue").mod.quick()
    assert running.wait(LIMIT_S)
    assert cage.call_status(held).state == "accepted"  # running
    assert cage.call_status(behind) == pmq.CallStatus("accepted", None, 0)  # waiting
    outbound = cage.execute.on("ledger_queue").accounts.credit(1)
    assert cage.call_status(outbound).state == "stored"  # waits for the transport
    release.set()
    refused = cage.execute.on("loopback_queue").mod.refuse()
    wait_until(lambda: cage.store is not None and cage.store.pending("loopback_queue") == 0,
               "the loopback queue drains")
    assert cage.call_status(held).state == "executed"
    assert cage.call_status(behind).state == "executed"
    assert cage.call_status(refused) == pmq.CallStatus("dead", "rejected", 1)
    assert cage.call_status("solo:00000000:1").state == "unknown"
    assert cage.call_status("no-such-id").state == "unknown"


def test_dead_letters_survive_a_restart(make_cage: Callable[..., pmq.Cage], tmp_path: Path) -> None:
    """Dead letters (reason, detail, attempts) are the same after stop and start; replay works."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise pmq.Reject("later")

    cage = make_cage(expose={"mod": Mod()})
    call_id = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    letters = cage.dead_letters()
    cage.stop()

    class Fixed:
        def f(self) -> None:
            log.add(("fixed", pmq.current_call().attempt))  # type: ignore[union-attr]

    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Fixed()})
    assert again.dead_letters() == letters
    again.replay(call_id)
    again.drain(timeout=LIMIT_S)
    assert log.items == [1, ("fixed", 1)]
    assert again.dead_letters() == []


# ---- transactions ----------------------------------------------------------------------------


def test_transaction_stores_its_calls_together_and_gives_ids_after(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """Calls in a transaction return None; xa.call_ids holds their ids in order; all of them run."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add((x, pmq.current_call().call_id))  # type: ignore[union-attr]

    cage = make_cage(expose={"mod": Mod()})
    before = next_seq(cage)
    with cage.transaction() as xa:
        results = [xa.on("loopback_queue").mod.f(x) for x in range(4)]
        results.append(xa.on("loopback_queue", id="named").mod.f(4))
        assert xa.call_ids == []
    assert results == [None] * 5
    assert len(xa.call_ids) == 5 and xa.call_ids[4] == "named"
    assert next_seq(cage) == before + 5  # one record per call, nothing else yet
    cage.drain(timeout=LIMIT_S)
    assert sorted(log.items) == [(x, xa.call_ids[x]) for x in range(5)]


def test_transaction_that_raises_stores_nothing(make_cage: Callable[..., pmq.Cage]) -> None:
    """A block that raises stores none of its calls: none runs and the journal is unchanged."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()})
    before = next_seq(cage)
    with pytest.raises(ZeroDivisionError), cage.transaction() as xa:
        xa.on("loopback_queue").mod.f(1)
        xa.on("loopback_queue").mod.f(2)
        1 / 0  # noqa: B018
    with pytest.raises(TypeError, match="args\\[0\\]"), cage.transaction() as xa2:
        xa2.on("loopback_queue").mod.f(3)
        xa2.on("loopback_queue").mod.f(object())
    assert next_seq(cage) == before
    assert xa.call_ids == [] and xa2.call_ids == []
    cage.execute.on("loopback_queue").mod.f(4)  # a marker: once it ran, nothing else will
    cage.drain(timeout=LIMIT_S)
    assert log.items == [4]
    assert cage.stats()["counters"]["enqueued"] == 1


def test_empty_transaction_stores_nothing(make_cage: Callable[..., pmq.Cage]) -> None:
    """A transaction with no calls writes nothing and has no ids."""
    cage = make_cage()
    before = next_seq(cage)
    with cage.transaction() as xa:
        pass
    assert xa.call_ids == [] and next_seq(cage) == before


def test_transaction_of_1000_calls_costs_one_fsync(make_cage: Callable[..., pmq.Cage]) -> None:
    """1,000 queued calls in one transaction are one journal frame and one fsync."""
    # The calls go to a peer's outbound queue: with no transport nothing takes them, so no
    # ATTEMPT record (which the dispatcher fsyncs) can slip in between the block and the count.
    cage = make_cage(peers={"ledger": "127.0.0.1:1"})
    assert cage.store is not None
    journal = cage.store.journal
    before = journal.stats()
    with cage.transaction() as xa:
        for n in range(1000):
            xa.on("ledger_queue").accounts.credit(n, amount=n)
    after = journal.stats()
    assert len(xa.call_ids) == 1000
    assert after["fsyncs"] - before["fsyncs"] == 1
    assert after["frames"] - before["frames"] == 1
    assert after["records"] - before["records"] == 1000
    assert cage.store.pending("ledger_queue", outbound=True) == 1000


def test_async_transaction_of_1000_loopback_calls_costs_one_fsync(tmp_path: Path) -> None:
    """1,000 loopback calls in one ``async with atransaction()``: one frame, one fsync, all run."""
    # The cage runs on this loop and its dispatcher is idle (a first call has run), so nothing
    # wakes it while the block's commit is awaited, and the counters are read without an await
    # after the block: no ATTEMPT record (which the dispatcher fsyncs) can slip in.
    log = Log()

    class Mod:
        def f(self, n: int) -> None:
            log.add(n)

    async def main() -> tuple[dict[str, float], dict[str, float], list[str]]:
        async with pmq.Cage("solo", data_dir=tmp_path / "solo", expose={"mod": Mod()}) as cage:
            assert cage.store is not None
            journal = cage.store.journal
            await cage.aexecute.on("loopback_queue").mod.f(-1)  # the dispatcher is running...
            await cage.adrain(timeout=LIMIT_S)  # ...and idle
            await journal.sync_async()  # its DONE record is written, not left for our batch
            before = journal.stats()
            async with cage.atransaction() as xa:
                for n in range(1000):
                    xa.on("loopback_queue").mod.f(n)
            after = journal.stats()  # no await since the block ended
            await cage.adrain(timeout=LIMIT_S)
            return before, after, xa.call_ids

    before, after, ids = asyncio.run(main())
    assert after["fsyncs"] - before["fsyncs"] == 1
    assert after["frames"] - before["frames"] == 1
    assert len(set(ids)) == 1000
    assert sorted(log.items) == list(range(-1, 1000))


def test_transaction_over_max_pending_stores_nothing(make_cage: Callable[..., pmq.Cage]) -> None:
    """A transaction that would overfill an outbound queue raises QueueFull and stores none."""
    cage = make_cage(peers={"ledger": "127.0.0.1:1"},
                     queues={"ledger_queue": {"max_pending": 5}})
    before = next_seq(cage)
    with pytest.raises(pmq.QueueFull), cage.transaction() as xa:
        for n in range(6):
            xa.on("ledger_queue").accounts.credit(n)
    assert next_seq(cage) == before and xa.call_ids == []
    assert cage.store is not None and cage.store.pending("ledger_queue", outbound=True) == 0


# ---- user ids --------------------------------------------------------------------------------


def test_same_user_id_twice_runs_once(make_cage: Callable[..., pmq.Cage]) -> None:
    """A second call with the same id= from the same cage returns the id and is not stored."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()})
    first = cage.execute.on("loopback_queue", id="transfer/123").mod.f(1)
    cage.drain(timeout=LIMIT_S)
    before = next_seq(cage)
    second = cage.execute.on("loopback_queue", id="transfer/123").mod.f(2)
    assert first == second == "transfer/123"
    assert next_seq(cage) == before
    with cage.transaction() as xa:
        xa.on("loopback_queue", id="pair").mod.f(3)
        xa.on("loopback_queue", id="pair").mod.f(4)
        xa.on("loopback_queue", id="transfer/123").mod.f(5)
    assert xa.call_ids == ["pair", "pair", "transfer/123"]
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 3]
    assert cage.stats()["counters"]["duplicates"] == 3
    assert cage.call_status("transfer/123").state == "executed"


def test_same_user_id_runs_once_across_a_restart(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """A user id is remembered across stop and start: the repeated call is not stored again."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()})
    cage.execute.on("loopback_queue", id="once").mod.f(1)
    cage.drain(timeout=LIMIT_S)
    cage.stop()
    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Mod()})
    before = next_seq(again)
    assert again.execute.on("loopback_queue", id="once").mod.f(2) == "once"
    assert next_seq(again) == before
    assert again.call_status("once").state == "executed"
    again.drain(timeout=LIMIT_S)
    assert log.items == [1]


def test_user_id_is_forgotten_after_the_retention_window(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """Past ``retention`` seconds the same id is a new call again."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()}, retention=0.05)
    cage.execute.on("loopback_queue", id="short").mod.f(1)
    cage.drain(timeout=LIMIT_S)
    time.sleep(0.1)  # let the window pass (not a timing assertion: only a lower bound)
    cage.execute.on("loopback_queue", id="short").mod.f(2)
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2]
