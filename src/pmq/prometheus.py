"""Prometheus metrics of running cages, from ``cage.stats()`` (the optional ``pmq[prometheus]``).

Two ways in::

    server, port = pmq.prometheus.serve_metrics(cage, port=9464)   # its own /metrics endpoint
    ...
    server.shutdown()

    from prometheus_client import REGISTRY                          # or beside the app's metrics
    REGISTRY.register(pmq.prometheus.Collector(cage_a, cage_b))

Every number is read from ``cage.stats()`` at scrape time; nothing is counted twice and the
cage's hot paths do no work for the exporter. docs/observability.md lists the metrics.

Owns: turning ``stats()`` into metric families named ``pmq_...`` with the labels ``cage`` (and
``queue``, ``direction`` for queue gauges). Must not: be imported by ``pmq`` itself, or import
``prometheus_client`` before it is used: pmq does not depend on it, and ``import pmq`` must work
without it.

Invariants:
- A counter of ``stats()`` becomes ``pmq_<section>_<name>_total`` (section ``store`` for
  ``stats()["counters"]``, ``dispatch``, ``transport`` and ``journal``); a counter added to
  ``stats()`` later is exported under that rule without a change here.
- A cage that is stopped (or stopped running calls) is reported as ``pmq_cage_up 0`` with no
  other samples, never as an error of the scrape.
- Counters count since the cage started (they are kept in memory): a restart resets them, which
  Prometheus' ``rate()`` and ``increase()`` handle as a counter reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pmq.cage import Cage

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["Collector", "serve_metrics"]

#: stats() section -> metric name prefix, for the sections that hold counters only.
COUNTER_SECTIONS = {"counters": "store", "dispatch": "dispatch", "transport": "transport"}
#: Journal statistics that only grow; the others (segments, mean_batch, seqs) are gauges.
JOURNAL_COUNTERS = frozenset({"journal_records", "journal_records_written", "journal_frames",
                              "journal_flushes", "journal_fsyncs", "journal_bytes"})
CAGE_LABELS = ("cage",)
#: direction: "outbound" for calls waiting to be sent to a peer, "inbound" for calls that run
#: here (from a peer, or loopback_queue); a peer's outbound and inbound queues share a name.
QUEUE_LABELS = ("cage", "queue", "direction")

HELP = {
    "store_enqueued": "Calls this cage stored with execute (to itself or to a peer).",
    "store_duplicates": "Calls dropped because a call with the same id= was seen before.",
    "store_attempts": "Attempts started (recorded before the handler runs).",
    "store_completed": "Calls completed: run here successfully, or acknowledged by the peer.",
    "store_failed": "Attempts that failed or asked to be retried and will run again.",
    "store_dead": "Calls moved to the dead letters.",
    "store_revived": "Dead letters sent back to their queue (cage.replay).",
    "store_purged": "Dead letters deleted (cage.purge).",
    "store_relocated": "Pending calls copied forward so old journal segments can go.",
    "store_accepted": "Calls accepted from other cages.",
    "store_refused": "Calls from other cages refused (not exposed to them).",
    "dispatch_executed": "Handlers that returned.",
    "dispatch_failed": "Handlers that raised (other than Retry and Reject).",
    "dispatch_retried": "Handlers that raised pmq.Retry.",
    "dispatch_rejected": "Handlers that raised pmq.Reject.",
    "dispatch_expired": "Calls whose deadline passed before they could run or run again.",
    "dispatch_not_exposed": "Calls to a module or method this cage does not expose.",
    "dispatch_too_many_attempts": "Calls buried after max_attempts failed attempts.",
    "dispatch_crashed": "Calls buried after max_crashes attempts during which the process died.",
    "transport_sent": "Calls sent to peers (a call sent again after a reconnect counts again).",
    "transport_transmitted": "Calls peers acknowledged.",
    "transport_refused": "Calls peers refused.",
    "transport_accepted_batches": "Batches of calls accepted from peers.",
    "transport_connections": "Connections accepted from peers.",
    "transport_rejected_connections": "Connections dropped in the handshake.",
    "journal_records": "Records appended to the journal.",
    "journal_records_written": "Records written to the journal files.",
    "journal_frames": "Journal frames written.",
    "journal_flushes": "Journal writes (one per group-commit batch).",
    "journal_fsyncs": "fsyncs of the journal.",
    "journal_bytes": "Bytes written to the journal.",
    "journal_segments": "Journal segment files.",
    "journal_mean_batch": "Records written per journal flush, on average since the start.",
    "journal_durable_seq": "Highest journal sequence number known to be on stable storage.",
    "journal_next_seq": "Sequence number the next journal record gets.",
    "cage_up": "1 while the cage runs calls, 0 when it is stopped or stopped running calls.",
    "queue_waiting": "Calls waiting in the queue.",
    "queue_taken": "Calls of the queue being run or sent right now.",
    "dead_letters": "Calls in the dead letters now.",
}

_MISSING_CLIENT = ("pmq.prometheus needs the prometheus_client package: install pmq with "
                   "the extra `pip install 'pmq[prometheus]'` (or `pip install prometheus_client`)")


def _require_client() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING_CLIENT, name=exc.name) from exc


class Collector:
    """A prometheus_client collector of the statistics of one or more cages.

    Register one Collector for all the cages of a process: two collectors on one registry
    would export the same metric names, which the registry refuses (``DuplicateTimeseries``).

    Args:
        cages: the cages to report, told apart by the ``cage`` label; more with ``add``.

    Raises:
        ImportError: prometheus_client is not installed (the message names ``pmq[prometheus]``).
    """

    def __init__(self, *cages: Cage) -> None:
        _require_client()
        self._cages: list[Cage] = list(cages)

    def add(self, cage: Cage) -> None:
        """Report `cage` too, from the next scrape on."""
        if cage not in self._cages:
            self._cages.append(cage)

    def remove(self, cage: Cage) -> None:
        """Stop reporting `cage`."""
        self._cages.remove(cage)

    def describe(self) -> list[Metric]:
        """The families (without samples), so a registry can refuse clashing names."""
        families = _Families()
        families.declare_fixed()
        return families.all()

    def collect(self) -> Iterator[Metric]:
        """The families of every cage, read from ``cage.stats()`` now."""
        families = _Families()
        for cage in list(self._cages):
            try:
                stats = cage.stats()
            except RuntimeError:  # not started, stopped, or stopped running calls
                families.gauge("cage_up").add_metric([cage.name], 0)
                continue
            families.gauge("cage_up").add_metric([cage.name], 1)
            _add_cage(families, cage.name, stats)
        return iter(families.all())


def _add_cage(families: _Families, cage: str, stats: dict[str, Any]) -> None:
    for section, prefix in COUNTER_SECTIONS.items():
        for name, value in (stats.get(section) or {}).items():
            families.counter(f"{prefix}_{name}").add_metric([cage], value)
    for key, value in (stats.get("journal") or {}).items():
        name = f"journal_{key}"
        family = families.counter(name) if name in JOURNAL_COUNTERS else families.gauge(name)
        family.add_metric([cage], value)
    for (queue, outbound), sizes in (stats.get("queues") or {}).items():
        labels = [cage, queue, "outbound" if outbound else "inbound"]
        families.gauge("queue_waiting", QUEUE_LABELS).add_metric(labels, sizes["waiting"])
        families.gauge("queue_taken", QUEUE_LABELS).add_metric(labels, sizes["taken"])
    if "dead" in stats:
        families.gauge("dead_letters").add_metric([cage], stats["dead"])


class _Families:
    """Metric families by name, each made once however many cages add samples to it."""

    def __init__(self) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._counter_type = CounterMetricFamily
        self._gauge_type = GaugeMetricFamily
        self._counters: dict[str, CounterMetricFamily] = {}
        self._gauges: dict[str, GaugeMetricFamily] = {}

    def counter(self, name: str) -> CounterMetricFamily:
        """The family of the counter ``pmq_<name>_total``, labelled by cage."""
        family = self._counters.get(name)
        if family is None:
            family = self._counters[name] = self._counter_type(
                f"pmq_{name}", HELP.get(name, f"pmq counter {name}."), labels=CAGE_LABELS)
        return family

    def gauge(self, name: str, labels: Sequence[str] = CAGE_LABELS) -> GaugeMetricFamily:
        """The family of the gauge ``pmq_<name>``."""
        family = self._gauges.get(name)
        if family is None:
            family = self._gauges[name] = self._gauge_type(
                f"pmq_{name}", HELP.get(name, f"pmq gauge {name}."), labels=labels)
        return family

    def declare_fixed(self) -> None:
        """Make the families every running cage exports (without samples)."""
        self.gauge("cage_up")
        self.gauge("queue_waiting", QUEUE_LABELS)
        self.gauge("queue_taken", QUEUE_LABELS)
        self.gauge("dead_letters")
        for name in HELP:
            if name.startswith(("store_", "dispatch_", "transport_")) or name in JOURNAL_COUNTERS:
                self.counter(name)
            elif name.startswith("journal_"):
                self.gauge(name)

    def all(self) -> list[Metric]:
        return [*self._gauges.values(), *self._counters.values()]


def serve_metrics(cages: Cage | Iterable[Cage], port: int = 0, addr: str = "127.0.0.1", *,
                  registry: CollectorRegistry | None = None) -> tuple[WSGIServer, int]:
    """Serve the metrics of `cages` over HTTP (any path, e.g. ``/metrics``) from a thread.

    Args:
        cages: a cage, or several (one ``Collector`` reports them all).
        port: the TCP port; 0 lets the OS choose a free one (returned).
        addr: the address to listen on; loopback by default: metrics name cages, queues and
            peers, so exposing them beyond the host is a decision to make explicitly.
        registry: register the collector there instead of in a new registry of its own (the
            default keeps pmq's metrics apart from prometheus_client's global REGISTRY, so
            serving twice in one process, as tests do, raises no ``DuplicateTimeseries``).

    Returns:
        (server, port): stop the server with ``server.shutdown(); server.server_close()``.

    Raises:
        ImportError: prometheus_client is not installed (the message names ``pmq[prometheus]``).
        OSError: the address cannot be bound.
    """
    _require_client()
    from prometheus_client import CollectorRegistry, start_http_server

    collector = Collector(*([cages] if isinstance(cages, Cage) else cages))
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, int(server.server_port)
