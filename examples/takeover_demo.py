"""Two kapbit instances on one Kafka topic: the second fences the first and takes over.

Shows what happens when a new instance starts while an old one still runs, as in a
rolling deploy or after a network partition:

1. instance A accepts four shipments; each one reserves stock and then waits in the
   "pack" step;
2. instance B starts on the same topic: it claims every partition (an ``ActiveWriter``
   event), finds the four unfinished workflows in the log, and resumes them at "pack";
3. A's packing ends, A tries to write the outcome and gets ``Fenced``: it stops, and its
   callers get ``Fenced`` too. Nothing A wrote after B's claim is acted on;
4. B finishes the four shipments; each result tells which instance ran which step.

Both instances run in this one process, to keep the story in one place. Needs a Kafka
broker, e.g. a local one listening on localhost:9092::

    python examples/takeover_demo.py --bootstrap localhost:9092
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

from kapbit import Definition, Fenced, Kapbit, Progress, Step, Success
from kapbit.repository.kafka import KafkaRepository

SHIPMENTS = ["ship-1", "ship-2", "ship-3", "ship-4"]


class Packing:
    """Holds A's workflows in their "pack" step until the demo lets them go."""

    def __init__(self) -> None:
        self.waiting: set[str] = set()
        self.all_waiting = asyncio.Event()
        self.done = asyncio.Event()

    async def wait(self, shipment_id: str) -> None:
        self.waiting.add(shipment_id)
        if len(self.waiting) == len(SHIPMENTS):
            self.all_waiting.set()
        await self.done.wait()


def shipment(instance: str, packing: Packing | None = None) -> Definition[str, str, str]:
    """The shipment workflow as run by ``instance``; every step records who ran it."""

    def reserve(shipment_id: str, _progress: Progress) -> Success[str]:
        return Success(instance)

    async def pack(shipment_id: str, _progress: Progress) -> Success[str]:
        if packing is not None:
            await packing.wait(shipment_id)
        return Success(instance)

    def send(shipment_id: str, _progress: Progress) -> Success[str]:
        return Success(instance)

    def who_did_what(shipment_id: str, progress: Progress) -> str:
        return ", ".join(
            f"{step} by {progress.value(step)}" for step in ("reserve", "pack", "send")
        )

    return Definition(
        "shipment",
        steps=[Step(reserve, name="reserve"), Step(pack, name="pack"), Step(send, name="send")],
        result=who_did_what,
        input_type=str,
        outcome_type=str,
        result_type=str,
    )


async def run_on_a(kbit: Kapbit, definition: Definition[str, str, str], shipment_id: str) -> str:
    try:
        result = await kbit.exec_workflow(definition, shipment_id, shipment_id)
    except Fenced as exc:
        return f"A: {shipment_id} -> Fenced: {exc}"
    return f"A: {shipment_id} finished on A ({result}): A was not fenced"


async def main(bootstrap: str, topic: str) -> None:
    packing = Packing()
    on_a = shipment("A", packing)
    a = Kapbit([on_a], KafkaRepository(bootstrap, topic, partitions=2))
    await a.start()
    print(f"A: started on topic {topic!r} (node {a.node_id})")
    calls = [asyncio.create_task(run_on_a(a, on_a, shipment_id)) for shipment_id in SHIPMENTS]
    await packing.all_waiting.wait()
    print(f"A: {len(SHIPMENTS)} shipments reserved, all of them now packing")

    on_b = shipment("B")
    b = Kapbit([on_b], KafkaRepository(bootstrap, topic))
    await b.start()
    print(
        f"B: started on the same topic (node {b.node_id}): claimed every partition and "
        f"resumed {b.stats.recovered} unfinished workflows"
    )

    print("A: packing done, writing the outcomes ...")
    packing.done.set()
    for line in await asyncio.gather(*calls):
        print(line)
    try:
        await a.exec_workflow(on_a, "ship-5", "ship-5")
    except Fenced:
        print(f"A: running={a.is_running}; a new workflow on A -> Fenced")
    await a.close()

    for shipment_id in SHIPMENTS:
        print(f"B: {shipment_id}: {await b.wait_result(shipment_id, timeout=30)}")
    fresh = await b.exec_workflow(on_b, "ship-5", "ship-5")
    print(f"B: new workflow ship-5: {fresh}")
    await b.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="localhost:9092", help="Kafka bootstrap servers")
    parser.add_argument("--topic", default=f"shipments-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()
    asyncio.run(main(args.bootstrap, args.topic))
