"""pmq's pytest plugin (pmq.testing), used from a small test project the way a user would.

Each test writes a user's project (a pyproject.toml with strict pytest settings and a test
module) and runs pytest on it in a fresh interpreter, so the plugin is found the way it is on a
user's machine: through the ``pytest11`` entry point of the installed pmq. While that entry
point is not declared (an installed pmq without it), the project's conftest.py names the plugin
instead (``pytest_plugins = ["pmq.testing"]``); naming it there as well as through the entry
point would register the module twice, which pytest refuses.

What must hold: the fixtures give started cages in temporary directories that are stopped at
teardown; ``drain(timeout=...)`` lets a test assert on the effects of queued calls without
sleeping, and gives up with ``pmq.Timeout``; a pair of cages delivers calls between them.
"""

from __future__ import annotations

import textwrap
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

#: True when the installed pmq declares its plugin as a ``pytest11`` entry point.
ENTRY_POINT = any(ep.value == "pmq.testing" for ep in entry_points(group="pytest11"))

USER_PYPROJECT = """\
[tool.pytest.ini_options]
addopts = ["--strict-markers", "--strict-config", "-p", "no:cacheprovider"]
filterwarnings = ["error"]
"""

USER_TESTS = '''
import threading

import pytest

import pmq
from pmq.testing import FAST_RETRY


class Ledger:
    def __init__(self):
        self.balances = {}

    def credit(self, account, amount):
        self.balances[account] = self.balances.get(account, 0) + amount


class Broken:
    def explode(self):
        raise ValueError("boom")


made = []


def test_queued_call_has_run_once_drain_returns(pmq_cage):
    ledger = Ledger()
    pmq_cage.expose("ledger", ledger)
    call_id = pmq_cage.execute.on("loopback_queue").ledger.credit(42, amount=10)
    pmq_cage.drain(timeout=10)
    assert ledger.balances == {42: 10}
    assert pmq_cage.call_status(call_id).state in ("executed", "unknown")
    made.append(pmq_cage)


def test_the_fixture_stopped_the_cage_at_teardown():
    assert made and made[0].store is None


def test_a_call_from_a_runs_on_b(pmq_cage_pair):
    a, b = pmq_cage_pair
    ledger = Ledger()
    b.expose("ledger", ledger)
    a.execute.on("b_queue").ledger.credit(7, amount=3)
    a.drain(timeout=30)      # b has accepted it
    b.drain(timeout=30)      # b has run it
    assert ledger.balances == {7: 3}


def test_pair_drain_waits_for_calls_both_ways(pmq_cage_pair):
    a, b = pmq_cage_pair
    ledger = Ledger()

    class Forwarder:
        def forward(self, account):
            pmq.execute.on("a_queue").ledger.credit(account, amount=1)

    a.expose("ledger", ledger)
    b.expose("forwarder", Forwarder())
    for account in range(5):
        a.execute.on("b_queue").forwarder.forward(account)
    pmq_cage_pair.drain(timeout=30)
    assert ledger.balances == dict.fromkeys(range(5), 1)


def test_a_failing_handler_ends_in_the_dead_letters(pmq_cage_factory):
    cage = pmq_cage_factory("broken", expose={"broken": Broken()},
                            queues={"default": {**FAST_RETRY, "max_attempts": 2}})
    call_id = cage.execute.on("loopback_queue").broken.explode()
    cage.drain(timeout=10)
    [letter] = cage.dead_letters()
    assert (letter.call_id, letter.reason, letter.attempts) == (call_id, "max attempts", 2)
    assert "ValueError: boom" in letter.detail


def test_drain_gives_up_with_timeout(pmq_cage):
    release = threading.Event()

    class Slow:
        def wait(self):
            release.wait(30)

    pmq_cage.expose("slow", Slow())
    pmq_cage.execute.on("loopback_queue").slow.wait()
    with pytest.raises(pmq.Timeout):
        pmq_cage.drain(timeout=0.2)
    release.set()
    pmq_cage.drain(timeout=10)
'''


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """An empty user project with strict pytest settings that loads pmq's plugin."""
    pytester.makefile(".toml", pyproject=USER_PYPROJECT)
    if not ENTRY_POINT:
        # TODO: delete once pyproject.toml declares [project.entry-points.pytest11].
        pytester.makeconftest('pytest_plugins = ["pmq.testing"]\n')
    return pytester


def test_users_fixtures_run_queued_calls_and_wait_for_them(user_project: pytest.Pytester) -> None:
    """A user's tests of loopback calls, a pair, dead letters and drain's timeout all pass."""
    user_project.makepyfile(test_user=USER_TESTS)
    result = user_project.runpytest_subprocess("-v")
    result.assert_outcomes(passed=6)
    # The report header says which pmq ran: the installed one, not a checkout's src/.
    result.stdout.fnmatch_lines(["pmq * from *pmq"])


def test_factory_reopens_the_directory_of_a_name_made_again(
        user_project: pytest.Pytester) -> None:
    """A cage made again under a stopped cage's name finds its calls; a running one's is locked."""
    user_project.makepyfile(test_restart='''
        import pytest

        import pmq

        # Port 9 (discard): nothing listens there, so the call waits in the outbound queue.
        PEERS = {"nowhere": "127.0.0.1:9"}


        def test_restart_keeps_stored_calls(pmq_cage_factory):
            first = pmq_cage_factory("svc", peers=PEERS)
            call_id = first.execute.on("nowhere_queue").box.put(1)
            first.stop()
            again = pmq_cage_factory("svc", peers=PEERS)
            assert again.data_dir == first.data_dir
            assert again.call_status(call_id).state == "stored"


        def test_a_running_cages_directory_is_locked(pmq_cage_factory):
            pmq_cage_factory("svc")
            with pytest.raises(pmq.JournalLocked):
                pmq_cage_factory("svc")
    ''')
    result = user_project.runpytest_subprocess()
    result.assert_outcomes(passed=2)


def test_teardown_reports_a_cage_that_fails_to_stop(user_project: pytest.Pytester) -> None:
    """A stop that raises at teardown is an error of the test, not a silent pass."""
    user_project.makepyfile(test_teardown='''
        def test_stop_fails(pmq_cage):
            real_stop = pmq_cage.stop

            def stop_then_fail():
                real_stop()
                raise OSError("disk gone")

            pmq_cage.stop = stop_then_fail
    ''')
    result = user_project.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*OSError: disk gone*"])


@pytest.mark.skipif(not ENTRY_POINT, reason="the installed pmq declares no pytest11 entry point "
                    "yet (pyproject.toml [project.entry-points.pytest11])")
def test_plugin_loads_through_its_entry_point(pytester: pytest.Pytester) -> None:
    """With pmq installed, a project with no conftest.py gets the fixtures."""
    pytester.makepyfile(test_plain=textwrap.dedent('''
        def test_fixture_is_there(pmq_cage):
            assert pmq_cage.name == "test"
    '''))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
