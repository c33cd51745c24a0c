"""The Kafka repository: kapbit's log in a Kafka topic, on aiokafka.

Records: key = workflow id, value = encoded event, headers = event kind and writer node
(:mod:`.records`). The producer uses ``acks="all"`` and neither idempotence nor
transactions, so it works on any Kafka-protocol broker. The package's parts, by job:

- :mod:`.admin`: create or check the topics; refuse a topic another application writes;
- :mod:`.outbox`: appends batched per partition into aiokafka batches;
- :mod:`.fencing`: an append is confirmed only once every offset between this node's
  ``ActiveWriter`` and the record is known to be harmless, by the rule of
  :mod:`kapbit.fencing` (docs/ARCHITECTURE.md, "Fencing"); a log that lost records
  (:class:`~kapbit.errors.LogLost`) is noticed by its offsets;
- :mod:`.reads`: long-lived consumers and the broker quirks they work around;
- :mod:`.checkpoints`: the compacted checkpoint topic, keyed by log;
- :mod:`.errors`: every error leaving the repository is a :mod:`kapbit.errors` type;
- :mod:`.group`: :class:`GroupMembership`, which partitions this instance owns when several
  share the topic through a Kafka consumer group (not used by the engine yet);
- :mod:`.requests`: :class:`KafkaRequestLog`, the request log (``<topic>-requests``) that
  forwarded calls travel through (:mod:`kapbit.forwarding`);
- :mod:`.repository`: :class:`KafkaRepository`, the front putting them together.
"""

from kapbit.repository.kafka.clients import CLIENT_DEFAULTS
from kapbit.repository.kafka.group import GroupMembership, OwnershipChange
from kapbit.repository.kafka.records import KIND_HEADER, NODE_HEADER
from kapbit.repository.kafka.repository import KafkaRepository
from kapbit.repository.kafka.requests import KafkaRequestLog

__all__ = [
    "CLIENT_DEFAULTS",
    "KIND_HEADER",
    "NODE_HEADER",
    "GroupMembership",
    "KafkaRepository",
    "KafkaRequestLog",
    "OwnershipChange",
]
