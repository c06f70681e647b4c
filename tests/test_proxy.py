"""The call chain ``proxy.on(target, ...).module.method(*args, **kwargs)`` (pmq.proxy).

What must hold (the module docstring of pmq.proxy):
- the chain hands ``submit`` its MethodRef (the parsed target, the names, the options) and the
  caller's args and kwargs untouched, and returns whatever ``submit`` returns;
- every option and name is checked where it is written, before ``submit`` is ever called;
- names starting with ``_`` raise AttributeError, so dunder probing, copy and hasattr behave.

The last section covers the exceptions a call through the chain raises or a handler raises to
steer its call (QueueFull, RemoteError, Retry, Reject), which live in pmq.errors.
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any, NamedTuple

import pytest

import pmq
from pmq.errors import PmqError, QueueFull, Reject, RemoteError, Retry
from pmq.proxy import MethodRef, Proxy


class CallSpec(NamedTuple):
    """What ``submit`` was given, flattened for comparison."""

    target: str
    queued: bool
    module: str
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    user_id: str | None
    expires_in: float | None
    timeout: float | None
    wait: bool


class Recorder:
    """A ``submit`` that records every call it gets and returns a marker."""

    def __init__(self) -> None:
        self.specs: list[CallSpec] = []
        self.refs: list[MethodRef[str]] = []

    def __call__(self, ref: MethodRef[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        self.refs.append(ref)
        self.specs.append(CallSpec(ref.target, ref.queued, ref.module, ref.method, args, kwargs,
                                   ref.user_id, ref.expires_in, ref.timeout, ref.wait))
        return f"submitted-{len(self.specs)}"


@pytest.fixture
def recorder() -> Recorder:
    """A fresh recording submit function."""
    return Recorder()


@pytest.fixture
def proxy(recorder: Recorder) -> Proxy[str]:
    """A proxy that records what it submits."""
    return Proxy(recorder)


# ---- the spec ---------------------------------------------------------------------------------


def test_submit_gets_the_method_ref_that_was_called(
    proxy: Proxy[str], recorder: Recorder
) -> None:
    """submit receives the very MethodRef the user called, so a kept reference is reused."""
    credit = proxy.on("ledger_queue").accounts.credit
    credit(1)
    credit(2)
    assert recorder.refs == [credit, credit]
    assert recorder.refs[0] is credit


def test_queued_call_builds_its_spec(proxy: Proxy[str], recorder: Recorder) -> None:
    """A '<cage>_queue' target becomes a queued spec to that cage with all options."""
    result = proxy.on("ledger_queue", id="transfer/123", expires_in=600).accounts.credit(
        42, amount=10
    )
    assert result == "submitted-1"
    assert recorder.specs == [
        CallSpec("ledger", True, "accounts", "credit", (42,), {"amount": 10},
                 "transfer/123", 600.0, None, False)
    ]  # fmt: skip
    assert type(recorder.specs[0].expires_in) is float


def test_loopback_queue_targets_the_cage_itself(proxy: Proxy[str], recorder: Recorder) -> None:
    """'loopback_queue' is a queued call with target 'loopback'."""
    proxy.on("loopback_queue", wait=True).invoices.reconcile()
    assert recorder.specs == [
        CallSpec("loopback", True, "invoices", "reconcile", (), {}, None, None, None, True)
    ]


def test_synchronous_call_builds_its_spec(proxy: Proxy[str], recorder: Recorder) -> None:
    """A bare cage name is a synchronous call; its timeout is a float."""
    proxy.on("ledger", timeout=5).accounts.balance(42)
    assert recorder.specs == [
        CallSpec("ledger", False, "accounts", "balance", (42,), {}, None, None, 5.0, False)
    ]
    assert type(recorder.specs[0].timeout) is float


def test_arguments_reach_submit_untouched(proxy: Proxy[str], recorder: Recorder) -> None:
    """The very objects the caller passed arrive in the spec, in order, unconverted."""
    payload, marker = [1, {"a": (2, 3)}], object()
    proxy.on("x_queue").m.f(payload, marker, b"raw", key=payload, other=marker)
    spec = recorder.specs[0]
    assert spec.args[0] is payload and spec.args[1] is marker and spec.args[2] == b"raw"
    assert spec.kwargs["key"] is payload and spec.kwargs["other"] is marker
    assert list(spec.kwargs) == ["key", "other"]


def test_option_names_are_free_as_keyword_arguments(proxy: Proxy[str], recorder: Recorder) -> None:
    """id=, timeout=, wait= and expires_in= given to the method belong to the method."""
    proxy.on("x_queue").m.f(id=1, timeout=2, wait=3, expires_in=4, target=5)
    spec = recorder.specs[0]
    assert spec.kwargs == {"id": 1, "timeout": 2, "wait": 3, "expires_in": 4, "target": 5}
    assert (spec.user_id, spec.timeout, spec.wait, spec.expires_in) == (None, None, False, None)


def test_one_target_serves_many_calls(proxy: Proxy[str], recorder: Recorder) -> None:
    """A target and a method reference can be kept and called again."""
    ledger = proxy.on("ledger_queue")
    credit = ledger.accounts.credit
    credit(1)
    credit(2)
    ledger.accounts.debit(3)
    assert [(s.method, s.args) for s in recorder.specs] == [
        ("credit", (1,)), ("credit", (2,)), ("debit", (3,)),
    ]  # fmt: skip


def test_submit_result_is_returned_whatever_it_is() -> None:
    """The chain returns what submit returns (an id, a result, an awaitable...)."""
    sentinel = object()
    assert Proxy(lambda spec, args, kwargs: sentinel).on("a").m.f() is sentinel


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"expires_in": 0}, ValueError, "expires_in= must be a finite number of seconds > 0"),
        ({"expires_in": -1.5}, ValueError, "got -1.5"),
        ({"expires_in": math.inf}, ValueError, "got inf"),
        ({"expires_in": math.nan}, ValueError, "got nan"),
        ({"expires_in": "60"}, TypeError, "expires_in= must be a number of seconds, not str"),
        ({"expires_in": True}, TypeError, "not bool"),
        ({"id": ""}, ValueError, "invalid call id ''"),
        ({"id": "a\nb"}, ValueError, "is not printable"),
        ({"id": "x" * 201}, ValueError, "at most 200"),
        ({"id": 17}, TypeError, "a call id must be a str, not int"),
        ({"wait": 1}, TypeError, "wait= must be True or False, not int"),
        ({"timeout": 5}, ValueError, "timeout= is for synchronous calls"),
        ({"timeout": -5}, ValueError, "timeout= must be a finite number of seconds > 0"),
    ],
)
def test_bad_options_of_a_queued_call_are_refused(
    proxy: Proxy[str], recorder: Recorder, options: dict[str, Any],
    error: type[Exception], fragment: str,
) -> None:  # fmt: skip
    """Each bad option of on('x_queue', ...) raises before anything is submitted."""
    with pytest.raises(error) as caught:
        proxy.on("ledger_queue", **options)
    assert fragment in str(caught.value)
    assert recorder.specs == []


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"timeout": 0}, ValueError, "timeout= must be a finite number of seconds > 0"),
        ({"timeout": math.nan}, ValueError, "got nan"),
        ({"timeout": "5"}, TypeError, "timeout= must be a number of seconds, not str"),
        ({"wait": True}, ValueError, "wait= is for queued calls; a synchronous call to 'ledger'"),
        ({"id": "x"}, ValueError, "id= is for queued calls, and 'ledger' is a synchronous call"),
        ({"expires_in": 5}, ValueError, "expires_in= is for queued calls, and 'ledger' is"),
    ],
)
def test_bad_options_of_a_synchronous_call_are_refused(
    proxy: Proxy[str], options: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    """Options that only fit queued calls, or bad timeouts, are refused for on('cage')."""
    with pytest.raises(error) as caught:
        proxy.on("ledger", **options)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("target", ["", "_queue", "a b", "x_queue_queue", "x" * 40])
def test_invalid_target_is_a_value_error(proxy: Proxy[str], target: str) -> None:
    """A target that is neither form raises ValueError quoting it."""
    with pytest.raises(ValueError, match="invalid target"):
        proxy.on(target)


def test_target_of_wrong_type_is_a_type_error(proxy: Proxy[str]) -> None:
    """A target that is not a str raises TypeError."""
    with pytest.raises(TypeError, match="a target must be a str"):
        proxy.on(b"ledger_queue")  # type: ignore[arg-type]


def test_queued_only_proxy_refuses_synchronous_targets(recorder: Recorder) -> None:
    """A transaction's proxy refuses 'ledger' and suggests 'ledger_queue'."""
    queued_only = Proxy(recorder, queued_only=True)
    with pytest.raises(ValueError, match="did you mean 'ledger_queue'"):
        queued_only.on("ledger")
    queued_only.on("ledger_queue").m.f()
    assert len(recorder.specs) == 1


@pytest.mark.parametrize("name", ["class", "None", "1abc", "a-b", "caf\u00e9", "x" * 129])
def test_invalid_module_name_is_a_value_error(
    proxy: Proxy[str], recorder: Recorder, name: str
) -> None:
    """getattr(target, 'class') raises ValueError naming the module name."""
    with pytest.raises(ValueError, match="invalid module name"):
        getattr(proxy.on("x_queue"), name)
    assert recorder.specs == []


@pytest.mark.parametrize("name", ["lambda", "2x", "has space"])
def test_invalid_method_name_is_a_value_error(proxy: Proxy[str], name: str) -> None:
    """getattr(module, 'lambda') raises ValueError naming the method name."""
    with pytest.raises(ValueError, match="invalid method name"):
        getattr(proxy.on("x_queue").m, name)


@pytest.mark.parametrize("name", ["_private", "__dunder__", "__iter__", "_"])
def test_underscore_names_are_attribute_errors(
    proxy: Proxy[str], recorder: Recorder, name: str
) -> None:
    """Private and dunder names raise AttributeError on a target, a module and a method."""
    target = proxy.on("x_queue")
    for holder in (target, target.m, target.m.f):
        with pytest.raises(AttributeError):
            getattr(holder, name)
        assert not hasattr(holder, name)
    assert recorder.specs == []


def test_attribute_of_a_method_is_explained(proxy: Proxy[str]) -> None:
    """target.m.f.g names nothing: the AttributeError says calls are module.method."""
    with pytest.raises(AttributeError, match=r"is a method: pmq calls are target.module.method"):
        proxy.on("x_queue").m.f.g  # noqa: B018 (the lookup is the test)


def test_chain_objects_survive_copy_without_recursion(proxy: Proxy[str]) -> None:
    """copy.copy probes dunders on an uninitialised instance; it must not recurse forever."""
    target = proxy.on("x_queue", id="a")
    assert repr(copy.copy(target)) == repr(target)
    assert repr(copy.copy(target.m.f)) == repr(target.m.f)


def test_chain_objects_survive_pickle_without_recursion(proxy: Proxy[str]) -> None:
    """Unpickling probes an uninitialised instance too; with a picklable submit it round-trips."""
    method = proxy.on("x_queue", expires_in=5).m.f
    again = pickle.loads(pickle.dumps(method))
    assert repr(again) == repr(method)
    assert again(1) == "submitted-1"


def test_reprs_show_target_module_and_method(proxy: Proxy[str]) -> None:
    """Each object of the chain says where it points."""
    target = proxy.on("ledger_queue", id="t/1", expires_in=60)
    assert repr(target) == "<pmq target 'ledger_queue' (queued, id='t/1', expires_in=60.0)>"
    assert repr(proxy.on("ledger", timeout=2)) == "<pmq target 'ledger' (synchronous, timeout=2.0)>"
    assert repr(target.accounts) == "<pmq module 'accounts' on 'ledger_queue'>"
    assert repr(target.accounts.credit) == "<pmq method 'accounts.credit' on 'ledger_queue'>"
    assert "queued calls only" in repr(Proxy(lambda spec, args, kwargs: None, queued_only=True))


# ---- exceptions around a call -----------------------------------------------------------------


def test_queue_full_carries_the_backlog_and_is_retriable() -> None:
    """QueueFull names the queue and the backlog, is a retriable PmqError and pickles."""
    error = QueueFull("ledger_queue", 1000, 4096, 1000, 1 << 20)
    assert isinstance(error, PmqError) and QueueFull.retriable
    assert (error.queue, error.pending, error.pending_bytes) == ("ledger_queue", 1000, 4096)
    assert "'ledger_queue' is full: 1000 calls (4096 bytes)" in str(error)
    assert "limits: 1000 calls, 1048576 bytes" in str(error)
    assert "nothing was stored" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), str(again), again.pending_bytes) == (QueueFull, str(error), 4096)
    assert "limits" not in str(QueueFull("a_queue", 1, 2))


def test_remote_error_shows_type_and_message_and_keeps_the_traceback() -> None:
    """str(RemoteError) is 'type: message'; the traceback text is kept; it pickles."""
    error = RemoteError("ledger.Overdrawn", "account 42 is short by 10", "Traceback ...\n")
    assert str(error) == "ledger.Overdrawn: account 42 is short by 10"
    assert isinstance(error, PmqError) and not RemoteError.retriable
    assert error.traceback_text == "Traceback ...\n"
    again = pickle.loads(pickle.dumps(error))
    assert (again.remote_type, again.message, again.traceback_text) == (
        "ledger.Overdrawn", "account 42 is short by 10", "Traceback ...\n",
    )  # fmt: skip


@pytest.mark.parametrize(("after", "expected"), [(None, None), (0, 0.0), (2.5, 2.5), (7, 7.0)])
def test_retry_takes_an_optional_delay(after: float | None, expected: float | None) -> None:
    """Retry(after) keeps a float delay (or None), is no PmqError, and pickles."""
    signal = Retry(after) if after is not None else Retry()
    assert signal.after == expected
    assert not isinstance(signal, PmqError)
    assert pickle.loads(pickle.dumps(signal)).after == expected
    assert "retry after" in str(signal)


@pytest.mark.parametrize(
    ("after", "error"),
    [(-1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
     ("5", TypeError), (True, TypeError)],
)  # fmt: skip
def test_retry_refuses_a_bad_delay(after: Any, error: type[Exception]) -> None:
    """A negative, non-finite or non-numeric delay is refused, naming Retry(after=...)."""
    with pytest.raises(error, match=r"Retry\(after=\.\.\.\)"):
        Retry(after)


def test_reject_keeps_its_reason() -> None:
    """Reject(reason) keeps the reason, is no PmqError, and pickles."""
    signal = Reject("account closed")
    assert (signal.reason, str(signal)) == ("account closed", "account closed")
    assert not isinstance(signal, PmqError)
    assert pickle.loads(pickle.dumps(signal)).reason == "account closed"
    with pytest.raises(TypeError, match="Reject"):
        Reject(42)  # type: ignore[arg-type]


def test_new_exceptions_are_exported_by_the_package() -> None:
    """pmq re-exports QueueFull, RemoteError, Retry and Reject."""
    for name in ("QueueFull", "RemoteError", "Retry", "Reject"):
        assert name in pmq.__all__
        assert getattr(pmq, name) is getattr(pmq.errors, name)
