"""kapbit's OpenTelemetry metrics served to Prometheus, and its spans printed.

Needs the ``otel`` extra, the OpenTelemetry SDK and its Prometheus exporter::

    pip install 'kapbit[otel]' opentelemetry-sdk opentelemetry-exporter-prometheus
    python examples/otel_prometheus.py             # prints the spans and kapbit's metrics
    python examples/otel_prometheus.py --serve     # then serves /metrics until Ctrl-C

It runs four orders (one retried in place, one declined and compensated), prints one line
per span, then scrapes its own ``/metrics`` endpoint (port 9464, Prometheus' default for
OpenTelemetry; ``--port 0`` picks a free one) and prints kapbit's series.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import urllib.request

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from prometheus_client import start_http_server

import kapbit
from kapbit import (
    Backoff,
    Definition,
    Failure,
    Kapbit,
    Options,
    Progress,
    Step,
    StepRetry,
    Success,
)
from kapbit.otel import OpenTelemetry
from kapbit.repository import MemRepository


def reserve(order: dict[str, int], _progress: Progress) -> Success[str]:
    return Success("reserved")


def release(order: dict[str, int], _progress: Progress) -> Success[str]:
    return Success("released")


async def charge(order: dict[str, int], _progress: Progress) -> Success[str] | Failure[str]:
    if order["amount"] > 1_000:
        return Failure("declined")
    if order["flaky"] and kapbit.context().attempt == 1:
        raise ConnectionError("payment provider busy")  # retried in place
    return Success("charged")


ORDER = Definition(
    "order",
    steps=[
        Step(reserve, release, name="reserve"),
        Step(charge, name="charge", retry=StepRetry(3, Backoff(0.01, 0.1, 0.01))),
    ],
    result=lambda order, progress: "compensated" if progress.failed else "charged",
    outcome_type=str,
    result_type=str,
)


def span_line(span: ReadableSpan) -> str:
    attributes = span.attributes or {}
    parent = "root" if span.parent is None else f"in {span.parent.span_id:016x}"
    return (
        f"span {span.name!r} {span.context.span_id:016x} {parent} "
        f"status={span.status.status_code.name} attempt={attributes.get('kapbit.attempt', '-')}\n"
    )


def scrape(port: int) -> list[str]:
    """kapbit's series from this process' own ``/metrics`` (buckets left out)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [
        line for line in text.splitlines() if line.startswith("kapbit_") and "_bucket" not in line
    ]


async def run_orders(instrumentation: OpenTelemetry, port: int) -> tuple[list[str], list[str]]:
    """Run the orders, then scrape while the instance still runs (its gauges with it)."""
    orders = {
        "o-1": {"amount": 100, "flaky": 0},
        "o-2": {"amount": 200, "flaky": 1},
        "o-3": {"amount": 5_000, "flaky": 0},
        "o-4": {"amount": 300, "flaky": 0},
    }
    options = Options(instrumentation=instrumentation)
    async with Kapbit([ORDER], MemRepository(), options=options) as kbit:
        results = [await kbit.exec_workflow(ORDER, oid, order) for oid, order in orders.items()]
        return results, await asyncio.to_thread(scrape, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--serve", action="store_true", help="keep serving /metrics")
    args = parser.parse_args()

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(formatter=span_line))
    )
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    server, _ = start_http_server(args.port, addr="127.0.0.1")
    port = server.server_port

    instrumentation = OpenTelemetry(tracer_provider, meter_provider)
    results, series = asyncio.run(run_orders(instrumentation, port))
    print("results:", results)
    for line in series:
        print(line)
    if args.serve:
        print(f"serving http://127.0.0.1:{port}/metrics; Ctrl-C stops")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()  # the server runs in its own thread
    server.shutdown()
    tracer_provider.shutdown()
    meter_provider.shutdown()


if __name__ == "__main__":
    main()
