"""``pmq demo`` and ``pmq bench`` as a user runs them, plus the demo's verdict on doctored files.

The two end-to-end runs are marked ``slow`` (each starts and SIGKILLs several processes, a few
seconds in all); ``make test`` runs them all the same, because ``make demo`` has to keep working.
The verdict tests feed ``pmq._demo._verdict`` files in which a call was lost or ran twice without a
kill, and check that the demo would say FAIL.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pmq import _demo

#: Only a limit on a hang: the demo itself takes a few seconds.
RUN_LIMIT_S = 300


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args, "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=RUN_LIMIT_S, cwd=tmp_path)


def _count(output: str, row: str) -> str:
    found = re.search(rf"^{row}\s+(\S+)", output, re.MULTILINE)
    assert found is not None, f"no {row!r} row in:\n{output}"
    return found.group(1)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_demo_loses_nothing_through_two_sigkills(tmp_path: Path) -> None:
    """`python -m pmq._demo` kills both cages mid-stream, exits 0 and tallies every call."""
    result = _run(tmp_path, "-m", "pmq._demo", "--calls", "3000")
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert re.search(r"SIGKILL ledger \(pid \d+\)", output), output
    assert re.search(r"SIGKILL billing \(pid \d+\)", output), output
    assert _count(output, "made") == "3,000"
    accepted = int(_count(output, "accepted").replace(",", ""))
    executed = int(_count(output, "executed").replace(",", ""))
    duplicates = int(_count(output, "duplicates").replace(",", ""))
    assert 3000 <= accepted <= executed
    assert executed - accepted >= duplicates
    assert _count(output, "lost") == "0"
    assert re.search(r"^dead letters\s+0 / 0\s", output, re.MULTILINE), output
    assert re.search(r"^throughput\s+[\d,]+/s\s", output, re.MULTILINE), output
    assert "PASS: every one of the 3,000 calls made ran, none was lost" in output
    assert list(tmp_path.iterdir()) == [], "the scratch directory was left behind"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="starts processes with fixed ports")
def test_bench_prints_a_table_of_every_row(tmp_path: Path) -> None:
    """`python -m pmq._bench` measures the four rows end to end and prints them as a table."""
    out = tmp_path / "bench.json"
    result = _run(tmp_path, "-m", "pmq._bench", "--calls", "2000", "--seconds", "1",
                  "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    for label in ("throughput, transactions of 1,000", "throughput, aexecute from 1,000 tasks",
                  "latency at 1,000 calls/s", "latency at 10,000 calls/s"):
        assert re.search(rf"^{re.escape(label)}\s+[\d,]+\s+[\d.]+\s+[\d,]+", result.stdout,
                         re.MULTILINE), result.stdout
    assert re.search(r"calls\s+seconds\s+calls/s\s+p50 ms\s+p99 ms", result.stdout)
    rows = json.loads(out.read_text())["results"]
    assert [r["row"] for r in rows] == ["xa", "async", "lat1k", "lat10k"]
    assert all(r.get("error") is None and r["calls_per_s"] > 0 for r in rows), rows
    assert [r["calls"] for r in rows] == [2000, 2000, 1000, 2000]


# ---- the picture: pmq bench --plot / --from-json (pmq._plot) -----------------------------------

#: A saved run of bench/compare_remote.py, cut down: one row of each kind, a failed and a
#: skipped one among them.
COMPARISON = {
    "kind": "pmq-remote-comparison", "created": "20261128-174545",
    "machine": {"cpu_count": 2, "python": "3.11.7", "fs_type": "ext4"},
    "results": [
        {"name": "redis_tput", "label": "Redis throughput", "calls_per_s": 27402.3,
         "error": None, "skipped": False, "extra": {}},
        {"name": "redis_lat10k", "label": "Redis latency at 10,000 calls/s", "calls_per_s": None,
         "error": "producer exited 1 before RESULT: MaxConnectionsError: Too many connections\n",
         "skipped": False, "extra": {}},
        {"name": "nats_tput", "label": "NATS JetStream throughput", "calls_per_s": None,
         "error": "not root, so cannot apt-get install nats-server", "skipped": True,
         "extra": {}},
        {"name": "pmq_tput_xa", "label": "pmq throughput, transactions of 1,000",
         "calls_per_s": 30240.4, "error": None, "skipped": False, "extra": {}},
        {"name": "pmq_lat10k", "label": "pmq latency at 10,000 calls/s", "calls_per_s": 6282.2,
         "error": None, "skipped": False, "extra": {"p50_ms": 27.4, "p99_ms": 134.5}},
    ],
}


def test_plot_reads_both_result_shapes_and_keeps_failed_rows() -> None:
    """``pmq._plot.measurements`` reads compare_remote's and pmq bench's JSON, failures too."""
    from pmq._plot import Measurement, measurements

    assert measurements(COMPARISON) == [
        Measurement("redis", "Redis", None, 27402.3),
        Measurement("redis", "Redis", 10000.0, None,
                    problem="failed: producer exited 1 before RESULT: MaxConnectionsError: "
                            "Too many connections"),
        Measurement("nats", "NATS JetStream", None, None,
                    problem="skipped: not root, so cannot apt-get install nats-server"),
        Measurement("pmq", "pmq, transactions of 1,000", None, 30240.4),
        Measurement("pmq", "pmq", 10000.0, 6282.2, 27.4, 134.5),
    ]
    bench = {"kind": "pmq-bench", "created": 1.0, "results": [
        {"row": "async", "label": "throughput, aexecute from 1,000 tasks", "calls_per_s": 9.0},
        {"row": "lat1k", "label": "latency at 1,000 calls/s", "error": "the consumer ran 0"},
    ]}
    assert measurements(bench) == [
        Measurement("pmq", "pmq, aexecute from 1,000 tasks", None, 9.0),
        Measurement("pmq", "pmq", 1000.0, None, problem="failed: the consumer ran 0"),
    ]
    with pytest.raises(ValueError, match="kind 'journal'"):
        measurements({"kind": "journal", "results": []})


def test_bench_from_json_draws_a_saved_run(tmp_path: Path) -> None:
    """``pmq bench --from-json RUN.json --plot F.png`` draws a saved run; bad uses are refused."""
    pytest.importorskip("matplotlib", reason="the plot extra: pip install 'pmq[plot]'")
    saved = tmp_path / "remote.json"
    saved.write_text(json.dumps(COMPARISON))
    picture = tmp_path / "performance.png"
    command = [sys.executable, "-m", "pmq", "bench", "--", "--from-json", str(saved)]
    result = subprocess.run([*command, "--plot", str(picture)], capture_output=True, text=True,
                            timeout=RUN_LIMIT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"plot saved to {picture}"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    usage = subprocess.run(command, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert usage.returncode == 2 and "give --plot FILE.png too" in usage.stderr
    saved.write_text(json.dumps({"kind": "journal", "results": []}))
    refused = subprocess.run([*command, "--plot", str(tmp_path / "no.png")],
                             capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert refused.returncode == 1 and "no plot: not a benchmark result" in refused.stdout
    assert not (tmp_path / "no.png").exists()


# ---- the verdict on doctored files ------------------------------------------------------------


def _life(number: int, killed: bool, progress: list[Any], drained: bool) -> Any:
    return SimpleNamespace(number=number, killed=killed, progress=progress,
                           drained={"dead": []} if drained else None)


def _fake_demo(tmp_path: Path, runs: list[str]) -> Any:
    """Billing made three calls (two in a transaction); ledger life 1 was killed."""
    (tmp_path / "billing-made-1.log").write_text("1:x0:0/2 b:1\n1:x0:1/2 b:2\n1:s1.0 b:3\n")
    (tmp_path / "ledger-runs-1.log").write_text("b:1 1 1:x0:0/2 10.0\n")
    (tmp_path / "ledger-runs-2.log").write_text("".join(line + "\n" for line in runs))
    lives = {"billing": [_life(1, False, [3, 9.0], True)],
             "ledger": [_life(1, True, [1], False), _life(2, False, [len(runs)], True)]}
    return SimpleNamespace(work=tmp_path, lives=lives,
                           current=lambda role: lives[role][-1])


def test_verdict_passes_a_rerun_after_a_kill(tmp_path: Path) -> None:
    """A call run again in a later ledger life, with a higher attempt, is an explained duplicate."""
    demo = _fake_demo(tmp_path, ["b:1 2 1:x0:0/2 11.0", "b:2 1 1:x0:1/2 11.0",
                                 "b:3 1 1:s1.0 12.0"])
    tally = _demo._verdict(demo)
    assert tally.problems == []
    rows = {name: count for name, count, _ in tally.rows}
    assert (rows["made"], rows["accepted"], rows["executed"], rows["duplicates"]) == (
        "3", "3", "4", "1")
    assert rows["lost"] == "0"


def test_verdict_reports_a_lost_call(tmp_path: Path) -> None:
    """A made call that never ran is LOST, and so is half a transaction."""
    demo = _fake_demo(tmp_path, ["b:1 2 1:x0:0/2 11.0", "b:3 1 1:s1.0 12.0"])
    problems = "\n".join(_demo._verdict(demo).problems)
    assert "made calls that never ran (LOST)" in problems
    assert "transactions that ran only in part" in problems


def test_verdict_reports_a_rerun_without_a_kill(tmp_path: Path) -> None:
    """A call that ran twice in a life that was not killed is not the documented case."""
    demo = _fake_demo(tmp_path, ["b:2 1 1:x0:1/2 11.0", "b:3 1 1:s1.0 12.0",
                                 "b:3 2 1:s1.0 12.5"])
    problems = "\n".join(_demo._verdict(demo).problems)
    assert "ran again without a kill of ledger" in problems


def test_synced_log_keeps_every_write_of_many_threads(tmp_path: Path) -> None:
    """SyncedLog (the demo's group commit) returns only written lines, none lost or mixed."""
    import threading

    log = _demo.SyncedLog(tmp_path / "log")
    threads = [threading.Thread(target=lambda t=t: [log.write(f"{t} {i}\n".encode())
                                                    for i in range(200)]) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert sorted(lines) == sorted(f"{t} {i}" for t in range(8) for i in range(200))
