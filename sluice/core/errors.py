"""sluice's own errors: one base class, so a caller can tell them from a library's.

Each names a condition an operator or a retrying task acts on. Errors that are part of another
protocol keep that base too (an upload failure is an IOError, an inconclusive Kafka probe a
KafkaError), so code that catches those catches them as before.
"""

from __future__ import annotations


class SluiceError(Exception):
    """Base of every error sluice raises on purpose."""


class SpoolDamaged(SluiceError):
    """A slot file is shorter than its committed size: the spool lost data outside sluice."""


class FileBusy(SluiceError):
    """Another process holds a slot file's lock past the wait (frozen, most likely)."""


class SlotsBusy(SluiceError):
    """All N slots of an app-hour stayed locked for lock_wait_seconds; the task retries."""


class LockLost(SluiceError):
    """The lease ran out under us: someone else may own the slot, so nothing is committed."""


class PayloadMissing(SluiceError, LookupError):
    """A batch is handed over but its payload is gone from Redis."""


class UploadFailed(SluiceError, IOError):
    """Some sealed files could not be archived; they stay sealed for the next sweep."""


class Damaged(SluiceError):
    """An archive stream ends inside a frame, or holds something that is not zstd."""


class NoIndex(Damaged):
    """An object ends without an index: written before indexes existed, or cut short."""
