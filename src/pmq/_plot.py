"""Pictures of benchmark results: throughput and latency of pmq, and of the systems measured
with it in the same run.

Why a module of its own: two programs draw the same picture from results of two shapes,
``pmq bench`` (pmq alone, ``--plot``, or ``--from-json`` to redraw a saved run) and
bench/compare_remote.py (pmq against Redis, RabbitMQ, NATS JetStream and persist-queue,
``--plot``); docs/performance.png comes from the second. Keeping the drawing here keeps
``pmq._bench`` about measuring, and lets bench/ use it without copying it.

Owns: reading both JSON shapes (``"kind": "pmq-bench"`` and ``"pmq-remote-comparison"``) into one
list of ``Measurement``, and drawing three panels: throughput per case, then p50 and p99 latency
per system at each offered rate (log scale: the systems differ by orders of magnitude). Must not:
measure anything, mix results of different runs in one picture, or need matplotlib to be
imported (it is optional, the ``plot`` extra: ``pip install "pmq[plot]"``).

Invariants: a case that failed or was skipped stays in the picture, marked as such, never
silently left out; a latency row whose system fell behind the offered rate says the rate it
managed.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Measurement", "measurements", "plot"]

PMQ_COLOR = "tab:blue"
OTHER_COLOR = "tab:gray"
P99_ALPHA = 0.45
#: A latency row that achieved less than this share of the offered rate "fell behind".
BEHIND_SHARE = 0.9
TITLES = {
    "redis": "Redis",
    "rabbitmq": "RabbitMQ",
    "nats": "NATS JetStream",
    "persist_queue": "persist-queue",
    "pmq": "pmq",
}


@dataclass(frozen=True)
class Measurement:
    """One row of a run: a throughput case, or a latency case at an offered rate."""

    system: str  # "pmq", "redis", ...
    case: str  # what the bar is labelled: "pmq, transactions of 1,000", "Redis"
    rate: float | None  # latency cases: calls/s offered; None for throughput
    calls_per_s: float | None
    p50_ms: float | None = None
    p99_ms: float | None = None
    problem: str | None = None  # "failed: ..." or "skipped: ..."


def measurements(report: dict[str, Any]) -> list[Measurement]:
    """The rows of a saved run, whichever program wrote it.

    Raises:
        ValueError: `report` is neither ``pmq bench --json`` nor bench/compare_remote.py output.
    """
    kind = report.get("kind")
    if kind == "pmq-bench":
        return [_of_bench(r) for r in report["results"]]
    if kind == "pmq-remote-comparison":
        return [_of_remote(r) for r in report["results"]]
    raise ValueError(
        f"not a benchmark result of pmq bench or bench/compare_remote.py (kind {kind!r})"
    )


def _of_bench(r: dict[str, Any]) -> Measurement:
    label = str(r["label"])  # "throughput, transactions of 1,000", "latency at 1,000 calls/s"
    rate: float | None = None
    if label.startswith("latency at "):
        rate = float(label.split()[2].replace(",", ""))
    case = "pmq" if rate else "pmq, " + label.removeprefix("throughput, ")
    if r.get("error"):
        return Measurement("pmq", case, rate, None, problem="failed: " + str(r["error"]))
    return Measurement("pmq", case, rate, r["calls_per_s"], r.get("p50_ms"), r.get("p99_ms"))


def _of_remote(r: dict[str, Any]) -> Measurement:
    name = str(r["name"])  # "redis_tput", "pmq_tput_xa", "nats_lat10k"
    rate: float | None = None
    if "_tput" in name:
        base, _, variant = name.partition("_tput")
    else:
        base, _, size = name.rpartition("_lat")
        variant = ""
        rate = float(size.removesuffix("k")) * 1000
    title = TITLES.get(base, base)
    case = title
    if rate is None and variant:  # pmq's two ways of sending
        case = f"{title}, " + str(r["label"]).removeprefix(f"{title} throughput, ")
    extra = r.get("extra") or {}
    if r.get("error"):
        how = "skipped" if r.get("skipped") else "failed"
        first = str(r["error"]).strip().splitlines()[0] if str(r["error"]).strip() else how
        return Measurement(base, case, rate, None, problem=f"{how}: {first}")
    return Measurement(base, case, rate, r.get("calls_per_s"), extra.get("p50_ms"),
                       extra.get("p99_ms"))


def plot(report: dict[str, Any], path: str) -> str:
    """Draw the run in `report` into the image file `path`; say what happened in one line.

    Never raises for a missing matplotlib or a file that cannot be written: the table is the
    result, the picture an extra.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        pyplot = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return 'no plot: matplotlib is not installed (pip install "pmq[plot]")'
    try:
        rows = measurements(report)
        figure = _draw(pyplot, rows, _title(report, rows))
        figure.savefig(path, dpi=120)
        pyplot.close(figure)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no plot: {exc}"
    return f"plot saved to {path}"


def _title(report: dict[str, Any], rows: list[Measurement]) -> str:
    machine = report.get("machine") or {}
    cpus = machine.get("cpu_count") or machine.get("cpus")
    python = machine.get("python")
    fs = machine.get("fs_type") or machine.get("fs")
    created = report.get("created")  # pmq bench: epoch seconds; compare_remote: "YYYYmmdd-HHMMSS"
    if isinstance(created, int | float):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
    else:
        try:
            when = time.strftime("%Y-%m-%d %H:%M", time.strptime(str(created), "%Y%m%d-%H%M%S"))
        except ValueError:
            when = str(created or "")
    where = ", ".join(x for x in (f"{cpus} CPUs" if cpus else "",
                                   f"Python {python}" if python else "", fs or "", when) if x)
    others = list(dict.fromkeys(TITLES.get(r.system, r.system) for r in rows
                                if r.system != "pmq"))
    what = f"pmq against {', '.join(others)}" if others else "pmq"
    return (f"{what}: queued calls between two processes on loopback, every acknowledgement "
            f"after an fsync\n{where}")


def _short(value: float) -> str:
    """``950``, ``27.4k``, ``1.52M``."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.3g} ms"


def _draw(pyplot: Any, rows: list[Measurement], title: str) -> Any:
    """The figure: throughput bars, then one latency panel per offered rate, one legend."""
    ticker = importlib.import_module("matplotlib.ticker")
    patches = importlib.import_module("matplotlib.patches")
    throughput = [r for r in rows if r.rate is None]
    rates = sorted({r.rate for r in rows if r.rate is not None})
    systems = list(dict.fromkeys(r.system for r in sorted(rows, key=lambda r: r.system != "pmq")))
    panels = 1 + len(rates)
    height = 0.5 * max(len(throughput), len(systems), 2) + 2.4
    figure, axes = pyplot.subplots(1, panels, figsize=(5.6 * panels, height), squeeze=False)
    _draw_throughput(axes[0][0], throughput)
    axes[0][0].xaxis.set_major_formatter(
        ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
    for axis, rate in zip(axes[0][1:], rates, strict=True):
        by_system = {r.system: r for r in rows if r.rate == rate}
        _draw_latency(axis, [by_system[s] for s in systems if s in by_system], rate)
    legend = [patches.Patch(color=PMQ_COLOR, label="pmq")]
    if len(systems) > 1:
        legend.append(patches.Patch(color=OTHER_COLOR, label="the others, same run"))
    if rates:
        legend += [patches.Patch(color="black", label="latency p50"),
                   patches.Patch(color="black", alpha=P99_ALPHA, label="latency p99")]
    figure.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8,
                  frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return figure


def _color(row: Measurement) -> str:
    return PMQ_COLOR if row.system == "pmq" else OTHER_COLOR


def _draw_throughput(axis: Any, rows: list[Measurement]) -> None:
    rows = sorted(rows, key=lambda r: r.calls_per_s or 0.0)  # barh draws bottom-up: best on top
    positions = list(range(len(rows)))
    axis.barh(positions, [r.calls_per_s or 0.0 for r in rows], color=[_color(r) for r in rows])
    axis.set_yticks(positions, [r.case for r in rows], fontsize=8)
    top = max([r.calls_per_s or 0.0 for r in rows] + [1.0])
    for y, row in zip(positions, rows, strict=True):
        text = f" {_short(row.calls_per_s)}/s" if row.calls_per_s else f" {_problem(row)}"
        axis.text(row.calls_per_s or 0.0, y, text, va="center", fontsize=8)
    axis.set_xlim(0, top * 1.35)
    axis.set_ylim(-0.8, max(len(rows), 2) - 0.2)
    axis.set_title("throughput, end to end (calls/s, more is better)", fontsize=9)
    axis.tick_params(axis="x", labelsize=8)


def _draw_latency(axis: Any, rows: list[Measurement], rate: float) -> None:
    rows = list(reversed(rows))  # pmq on top
    positions = list(range(len(rows)))
    height = 0.38
    p50 = [r.p50_ms or 0.0 for r in rows]
    p99 = [r.p99_ms or 0.0 for r in rows]
    colors = [_color(r) for r in rows]
    axis.barh([p + height / 2 for p in positions], p50, height, color=colors)
    axis.barh([p - height / 2 for p in positions], p99, height, color=colors, alpha=P99_ALPHA)
    axis.set_xscale("log")
    measured = [v for v in p50 + p99 if v > 0]
    low, high = (min(measured), max(measured)) if measured else (0.1, 10.0)
    axis.set_xlim(low / 2, high * 60)  # room for the numbers right of the longest bar
    axis.set_yticks(positions, [r.case for r in rows], fontsize=8)
    axis.set_ylim(-0.8, max(len(rows), 2) - 0.2)
    for y, row in zip(positions, rows, strict=True):
        if row.p50_ms is None or row.p99_ms is None:
            axis.text(low / 2, y, f" {_problem(row)}", va="center", fontsize=8)
            continue
        note = f" p50 {_ms(row.p50_ms)}, p99 {_ms(row.p99_ms)}"
        if row.calls_per_s is not None and row.calls_per_s < rate * BEHIND_SHARE:
            note += f"\n managed {_short(row.calls_per_s)}/s"
        axis.text(row.p99_ms, y, note, va="center", fontsize=7)
    axis.set_title(f"latency at {rate:,.0f} calls/s offered (ms, log scale; less is better)",
                   fontsize=9)
    axis.tick_params(axis="x", labelsize=8)


def _problem(row: Measurement) -> str:
    """``failed: Too many connections``: how, and the last clause of the first line of why."""
    how, _, why = (row.problem or "not measured").partition(": ")
    text = f"{how}: {why.rsplit(': ', 1)[-1]}" if why else how
    return text if len(text) <= 48 else text[:45] + "..."
