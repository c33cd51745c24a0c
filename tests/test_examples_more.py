"""The longer examples and the peer benchmark run as smoke tests, each in a subprocess.

The Kafka examples get the session's test broker through their ``--bootstrap`` argument.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(script: Path, *args: str, timeout: float) -> str:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_order_saga_on_kafka_ships_good_orders_and_compensates_declined_cards(
    kafka_bootstrap: str,
) -> None:
    out = run(EXAMPLES / "order_saga_kafka.py", "--bootstrap", kafka_bootstrap, timeout=120)
    lines = out.splitlines()
    for shipped in ("order-1", "order-3", "order-5"):
        assert f"{shipped}: shipped   tracking TRK-{shipped.upper()}" in lines
    for declined in ("order-2", "order-4"):
        assert f"{declined}: cancelled card declined; undone: stock released" in lines
    # Reservations of the declined orders were released: only shipped orders used stock.
    assert "stock left: {'KB-BOARD': 7, 'KB-CABLE': 9}" in lines
    assert "workflows: 3 shipped, 2 compensated" in lines


def test_breaker_gate_closes_probes_and_reopens() -> None:
    out = run(EXAMPLES / "breaker_gate.py", timeout=60)
    lines = [line.split("] ", 1)[-1] for line in out.splitlines()]

    def index(text: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(text))

    went_down = index("--- the payment service goes down")
    came_back = index("--- the payment service is back")
    # The breaker opened on the second failure and new workflows were refused meanwhile.
    assert went_down < index("breaker: closed -> open") < index("order-4: GateClosed")
    # While the service was down, the retry worker still probed it (trial calls failed).
    refused = [i for i, line in enumerate(lines) if line.endswith("-> connection refused")]
    assert len(refused) >= 3 and refused[-1] < came_back, out
    # Once back, a probe closed the breaker, and everything finished.
    assert came_back < index("breaker: half-open -> closed")
    for order_id in ("order-2", "order-3"):
        assert index(f"{order_id}: final result: ['paid 42.00 EUR'") > came_back
    assert index("order-4: done: ['paid 42.00 EUR'") > came_back
    assert "gate open: True; closed 1 time(s)" in lines
    assert lines[-1].startswith("done: 4 workflows succeeded")


def test_takeover_fences_the_first_instance_and_the_second_finishes(
    kafka_bootstrap: str,
) -> None:
    out = run(EXAMPLES / "takeover_demo.py", "--bootstrap", kafka_bootstrap, timeout=120)
    lines = out.splitlines()
    assert any(line.startswith("B: started") and "resumed 4 unfinished" in line for line in lines)
    for shipment_id in ("ship-1", "ship-2", "ship-3", "ship-4"):
        assert any(line.startswith(f"A: {shipment_id} -> Fenced") for line in lines), out
        # Reserved by A before the takeover; packed and sent by B after it.
        assert f"B: {shipment_id}: reserve by A, pack by B, send by B" in lines
    assert "A: running=False; a new workflow on A -> Fenced" in lines
    assert "B: new workflow ship-5: reserve by B, pack by B, send by B" in lines


def test_peer_benchmark_smoke_run_writes_its_results(tmp_path: Path) -> None:
    """Tiny sizes; a peer whose package is missing is reported, not fatal."""
    out = run(
        ROOT / "benchmarks" / "bench_peers.py",
        "--systems=kapbit-mem,dbos-sqlite",
        "--sequential=5",
        "--workflows=20",
        "--in-flight=10",
        "--no-plot",
        f"--out={tmp_path}",
        timeout=240,
    )
    assert "machine: " in out and "cores" in out
    with (tmp_path / "peers.csv").open(newline="") as results:
        rows = list(csv.DictReader(results))
    assert [(r["system"], r["scenario"], r["mode"]) for r in rows] == [
        (system, scenario, mode)
        for system in ("kapbit-mem", "dbos-sqlite")
        for scenario in ("ok", "compensate")
        for mode in ("sequential", "10 in flight")
    ]
    for row in rows[:4]:
        assert row["status"] == "ok", row
        assert float(row["workflows_per_s"]) > 0 and float(row["peak_rss_mib"]) > 0
        assert row["durability"].startswith("in-memory log: nothing durable")
    for row in rows[4:]:
        assert row["status"] == "ok" or row["status"].startswith("unavailable: dbos"), row
    meta = json.loads((tmp_path / "peers.meta.json").read_text())
    assert meta["machine"]["python"] == ".".join(map(str, sys.version_info[:3]))
