"""Counters an operator watches, readable from :attr:`kapbit.Kapbit.stats`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Stats:
    """Counts since the instance started; ``in_flight``, ``sleeping``, ``retrying`` and
    ``gate_open`` are current (``sleeping``: workflows waiting on a durable timer).

    ``snapshot_bytes`` is the size of the latest snapshot checkpoint written, summed over
    partitions; ``snapshots_too_large`` counts snapshots not written for being over
    ``CheckpointPolicy.snapshot_limit``. ``snapshots_following`` is how many partitions
    are pinned now (their snapshot reader follows the log), ``snapshot_wakes`` how often a
    save found a resting partition pinned and woke its reader.
    """

    started: int = 0
    recovered: int = 0
    succeeded: int = 0
    compensated: int = 0
    retried: int = 0
    dead_lettered: int = 0
    rejected: int = 0
    invalid_returns: int = 0
    in_flight: int = 0
    retrying: int = 0
    sleeping: int = 0
    gate_open: bool = True
    snapshot_bytes: int = 0
    snapshots_too_large: int = 0
    snapshots_following: int = 0
    snapshot_wakes: int = 0
