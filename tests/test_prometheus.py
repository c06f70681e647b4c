"""The Prometheus exporter (pmq.prometheus, the extra pmq[prometheus]), scraped over HTTP.

What must hold (docs/observability.md): every counter of ``cage.stats()`` is exported as
``pmq_<section>_<name>_total`` with a ``cage`` label, queue sizes as gauges labelled by cage,
queue and direction; a stopped cage reads ``pmq_cage_up 0`` instead of failing the scrape; and
without prometheus_client the module says which extra to install. The tests that need
prometheus_client skip when it is not installed.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from helpers import FAST_RETRY, LIMIT_S

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Box:
    """A handler that does nothing, and one that always fails."""

    def put(self, item: int) -> None:
        """Accept the item."""

    def explode(self) -> None:
        """Fail every attempt."""
        raise ValueError("boom")


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[Any, int]]]:
    """``serve_metrics`` whose servers are shut down at teardown."""
    pytest.importorskip("prometheus_client")
    from pmq.prometheus import serve_metrics

    servers: list[Any] = []

    def start(*args: Any, **kwargs: Any) -> tuple[Any, int]:
        server, port = serve_metrics(*args, **kwargs)
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def scrape(port: int) -> tuple[str, Samples]:
    """The text of the endpoint and its samples by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=LIMIT_S) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def labels(**values: str) -> frozenset[tuple[str, str]]:
    """Labels as the keys of ``Samples`` hold them."""
    return frozenset(values.items())


def test_counters_and_queue_gauges_after_calls(make_cage: Any,
                                               serve: Callable[..., tuple[Any, int]]) -> None:
    """Completed and dead calls show in the store, dispatch and journal metrics of the cage."""
    cage = make_cage("metrics", expose={"box": Box()},
                     queues={"default": {**FAST_RETRY, "max_attempts": 2}})
    for item in range(3):
        cage.execute.on("loopback_queue").box.put(item)
    cage.execute.on("loopback_queue").box.explode()
    cage.drain(timeout=LIMIT_S)
    _, port = serve(cage)

    text, samples = scrape(port)

    assert 'pmq_store_enqueued_total{cage="metrics"} 4.0' in text.splitlines()
    me = labels(cage="metrics")
    assert samples[("pmq_cage_up", me)] == 1
    assert samples[("pmq_store_completed_total", me)] == 3
    assert samples[("pmq_store_dead_total", me)] == 1
    assert samples[("pmq_store_attempts_total", me)] == 5  # 3 + the 2 failed ones
    assert samples[("pmq_dispatch_executed_total", me)] == 3
    assert samples[("pmq_dispatch_failed_total", me)] == 2
    assert samples[("pmq_dispatch_too_many_attempts_total", me)] == 1
    assert samples[("pmq_dead_letters", me)] == 1
    assert samples[("pmq_journal_fsyncs_total", me)] >= 1
    assert samples[("pmq_journal_bytes_total", me)] > 0
    loopback = labels(cage="metrics", queue="loopback_queue", direction="inbound")
    assert samples[("pmq_queue_waiting", loopback)] == 0
    assert samples[("pmq_queue_taken", loopback)] == 0


def test_calls_waiting_for_a_peer_show_as_an_outbound_queue(
        make_cage: Any, serve: Callable[..., tuple[Any, int]]) -> None:
    """Calls to a peer that is down wait in ``<peer>_queue`` with direction="outbound"."""
    # Port 9 (discard): nothing listens there, so the calls stay in the outbound queue.
    cage = make_cage("sender", peers={"ledger": "127.0.0.1:9"})
    for item in range(3):
        cage.execute.on("ledger_queue").box.put(item)
    _, port = serve(cage)

    _, samples = scrape(port)

    outbound = labels(cage="sender", queue="ledger_queue", direction="outbound")
    assert samples[("pmq_queue_waiting", outbound)] + samples[("pmq_queue_taken", outbound)] == 3
    assert samples[("pmq_store_completed_total", labels(cage="sender"))] == 0


def test_several_cages_share_one_endpoint_and_a_stopped_one_reads_down(
        make_cage: Any, serve: Callable[..., tuple[Any, int]]) -> None:
    """One endpoint reports each cage under its own label; a stopped cage is up 0, no error."""
    first = make_cage("first", expose={"box": Box()})
    second = make_cage("second")
    first.execute.on("loopback_queue").box.put(1)
    first.drain(timeout=LIMIT_S)
    _, port = serve([first, second])
    second.stop()

    _, samples = scrape(port)

    assert samples[("pmq_cage_up", labels(cage="first"))] == 1
    assert samples[("pmq_cage_up", labels(cage="second"))] == 0
    assert samples[("pmq_store_enqueued_total", labels(cage="first"))] == 1
    assert ("pmq_store_enqueued_total", labels(cage="second")) not in samples


def test_two_collectors_on_one_registry_are_refused(make_cage: Any) -> None:
    """The registry refuses a second Collector: one Collector must report all the cages."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.registry import CollectorRegistry

    from pmq.prometheus import Collector

    registry = CollectorRegistry()
    registry.register(Collector(make_cage("one")))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(Collector(make_cage("two")))
    assert b'pmq_cage_up{cage="one"} 1.0' in prometheus_client.generate_latest(registry)


def test_without_prometheus_client_the_error_names_the_extra() -> None:
    """pmq.prometheus imports without the client; using it raises ImportError naming the extra."""
    script = ("import sys\n"
              "sys.modules['prometheus_client'] = None  # as if not installed\n"
              "import pmq.prometheus\n"
              "try:\n"
              "    pmq.prometheus.Collector()\n"
              "except ImportError as exc:\n"
              "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=LIMIT_S, check=True)
    assert "pip install 'pmq[prometheus]'" in done.stdout
