"""How the Kafka package builds, starts and stops its aiokafka clients.

The log (:class:`~kapbit.repository.kafka.KafkaRepository`) and the request log
(:class:`~kapbit.repository.kafka.KafkaRequestLog`) connect the same way: the same client
defaults, plain ``acks="all"`` producers (fencing, not idempotence, decides which copy
counts), consumers outside any group, and a start that leaves nothing open when one
client cannot connect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from kapbit.errors import StartupError, TransientStorageError
from kapbit.repository.kafka.errors import BROKER_ERRORS

#: Defaults of every aiokafka client (``client_options`` override them). They decide how
#: fast an unreachable broker is noticed: a request fails after ``request_timeout_ms``
#: (aiokafka's own default, 40 s, would keep callers waiting long after the storage
#: breaker should have opened), a failed connection is retried after ``retry_backoff_ms``,
#: and a moved partition leader is looked up again after ``metadata_max_age_ms``.
CLIENT_DEFAULTS: dict[str, Any] = {
    "request_timeout_ms": 5_000,
    "retry_backoff_ms": 100,
    "metadata_max_age_ms": 60_000,
}


def with_defaults(client_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``client_options`` over :data:`CLIENT_DEFAULTS`."""
    return {**CLIENT_DEFAULTS, **(client_options or {})}


def new_producer(
    bootstrap_servers: str | list[str], options: Mapping[str, Any], **settings: Any
) -> AIOKafkaProducer:
    """A producer that waits for every replica (``acks="all"``) and sends at once
    (``linger_ms=0``); ``settings`` are defaults that ``options`` override."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=False,
        **{"linger_ms": 0, **settings, **options},
    )


def new_consumer(
    bootstrap_servers: str | list[str], options: Mapping[str, Any], fetch_max_wait_ms: int
) -> AIOKafkaConsumer:
    """A consumer outside any group, assigned its partitions by hand, starting at the
    earliest offset and committing nothing."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        **{
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            **options,
            "fetch_max_wait_ms": fetch_max_wait_ms,
        },
    )


class Client(Protocol):
    """What :func:`start_clients` starts and stops: an aiokafka client or a lane."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def start_clients(
    bootstrap_servers: str | list[str],
    clients: Sequence[Client],
    check: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start ``clients`` in order, then run ``check``; if anything fails, stop them all
    and raise StartupError (a broker error) or what was raised: nothing stays connected."""
    try:
        for client in clients:
            await client.start()
        if check is not None:
            await check()
    except (*BROKER_ERRORS, TransientStorageError) as exc:
        await stop_clients(clients)
        raise StartupError(f"cannot connect to Kafka at {bootstrap_servers}: {exc}") from exc
    except BaseException:
        await stop_clients(clients)
        raise


async def stop_clients(clients: Sequence[Client]) -> None:
    """Stop every client, whatever stopping one of them raises."""
    for client in clients:
        with contextlib.suppress(Exception):
            await client.stop()
