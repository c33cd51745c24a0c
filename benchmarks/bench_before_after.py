"""The order saga on MemRepository: this tree against an earlier commit, in one sitting.

Exports ``--rev`` (``git archive``) into a temporary directory and runs the same saga
(async steps, with the API both trees have: the string form of ``exec_workflow``) in
child processes, the two trees in turn, ``--runs`` times per codec. Prints the median
sequential p50 latency and the median workflows/s with 1,000 in flight of each tree, and
their ratio. With ``--instructions`` it also counts the instructions per workflow of each
tree under valgrind's callgrind (the count of 1,200 sequential workflows minus that of
200, over 1,000): a figure the load of a shared machine does not move.
Usage: ``python benchmarks/bench_before_after.py --rev REV [--runs 5] [--workflows 5000]
[--instructions]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from _common import drive, machine, machine_line, order, saga

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CODECS = ("json", "msgpack")


async def child(codec_name: str, sequential: int, in_flight: int, quiet: bool) -> dict[str, float]:
    """One measurement in this process, with whichever kapbit ``PYTHONPATH`` gives."""
    from kapbit import Kapbit, Options
    from kapbit.codecs import JsonCodec, MsgpackCodec
    from kapbit.options import CheckpointPolicy
    from kapbit.repository import MemRepository

    codec = JsonCodec() if codec_name == "json" else MsgpackCodec()
    options = Options(
        max_workflows=2_000,
        idempotency_window=max(sequential, in_flight, 1_000),
        # --instructions: no checkpoint on a timer, whose count would follow the load
        **({"checkpoints": CheckpointPolicy(interval=3_600)} if quiet else {}),
    )
    repository = MemRepository(partitions=8)
    async with Kapbit([saga()], repository, codec, options=options) as kbit:

        def runner(prefix: str) -> Callable[[int], Awaitable[object]]:
            return lambda i: kbit.exec_workflow(f"{prefix}-{i}", "order", order(i, "ok", prefix))

        await drive(runner("warm"), 1_000, 1)
        gc.collect()
        figures: dict[str, float] = {}
        if sequential:
            stats = await drive(runner("seq"), sequential, 1)
            figures["p50_us"] = stats.percentile(0.5) * 1e6
        if in_flight:
            stats = await drive(runner("par"), in_flight, 1_000)
            figures["rate"] = stats.rate
        return figures


def run_child(tree: Path, codec: str, sequential: int, in_flight: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", codec, str(sequential), str(in_flight)]
    done = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the run on {tree} failed:\n{done.stderr}")
    figures: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return figures


def instructions(tree: Path, codec: str) -> float:
    """Instructions per sequential workflow under callgrind (1,200 minus 200, over 1,000)."""
    counts = []
    for sequential in (200, 1_200):
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "callgrind.out"
            command = [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                codec,
                str(sequential),
                "0",
                "--quiet-checkpoints",
            ]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run(command, env=env, capture_output=True, check=True)
            totals = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
            assert totals is not None, "callgrind wrote no totals"
            counts.append(int(totals.group(1)))
    return (counts[1] - counts[0]) / 1_000


def export(rev: str, into: Path) -> None:
    """``rev``'s kapbit package, unpacked into ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "kapbit"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rev", help="the commit to compare with (e.g. b46cb0a)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workflows", type=int, default=5_000)
    parser.add_argument("--instructions", action="store_true", help="callgrind (valgrind)")
    parser.add_argument("--child", nargs=3, metavar=("CODEC", "SEQUENTIAL", "IN_FLIGHT"))
    parser.add_argument("--quiet-checkpoints", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        codec, sequential, in_flight = args.child
        figures = asyncio.run(child(codec, int(sequential), int(in_flight), args.quiet_checkpoints))
        print(json.dumps(figures))
        return
    if not args.rev:
        parser.error("--rev is required")
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind on the PATH")
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch)
        export(args.rev, before)
        trees = {args.rev: before, "this tree": ROOT}
        results: dict[tuple[str, str, str], list[float]] = {}
        for codec in CODECS:
            for _ in range(args.runs):
                for name, tree in trees.items():
                    figures = run_child(tree, codec, args.workflows, args.workflows)
                    for key, value in figures.items():
                        results.setdefault((codec, key, name), []).append(value)
            if args.instructions:
                for name, tree in trees.items():
                    results[codec, "instructions", name] = [instructions(tree, codec)]
    print(machine_line(machine()))
    print(
        f"order saga on MemRepository (async steps), {args.rev} against this tree; "
        f"{args.workflows} workflows per run, {args.runs} runs each in turn; medians"
    )
    print(f"{'codec':8} {'figure':32} {args.rev:>12} {'this tree':>12} {'ratio':>7}")
    labels = {
        "p50_us": "sequential p50 (us)",
        "rate": "1,000 in flight (workflows/s)",
        "instructions": "instructions per workflow",
    }
    for codec in CODECS:
        for key, label in labels.items():
            if (codec, key, args.rev) not in results:
                continue
            old = statistics.median(results[codec, key, args.rev])
            new = statistics.median(results[codec, key, "this tree"])
            print(f"{codec:8} {label:32} {old:12,.1f} {new:12,.1f} {new / old:7.2f}")


if __name__ == "__main__":
    main()
