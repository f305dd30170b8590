"""The Redis schema: every key sluice's processes share, and every format of a name or field in it.

This is the contract between the bridge, the workers, Beat and `sluice fetch`: a key or a format
changes here and nowhere else. The Lua scripts (sluice.core.scripts) receive their key names from
these builders, or, where a script builds names itself, the prefix from here
(`SLOT_STATE_PREFIX`, `SLOT_LOCK_PREFIX`) and the id formats documented on `slot_id` and
`app_hour`; tests/unit/test_schema.py checks the scripts' patterns against these builders.

Every key starts with `PREFIX`. sluice runs on one Redis server (or a primary with replicas):
some scripts build slot keys themselves, which Redis Cluster does not allow, so there is no
hash-tag rule. docs/ARCHITECTURE.md has the whole schema as a table.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

PREFIX = "sluice:"

# The version of this schema, "major.minor" (sluice.core.protocol).
SCHEMA_VERSION = PREFIX + "schema-version"

# --- the state's check against the spool (sluice.ops.repair) ----------------------------------------
# string: the run id of the Redis server whose state was last checked against the spool and
# repaired. A restarted server (its AOF lost its last writes), a promoted replica (behind its old
# primary) or an emptied one has another run id, or none of this key: every script that changes
# the state refuses (scripts.GUARD) until the repair has run.
VERIFIED = PREFIX + "verified"
REPAIR_LOCK = PREFIX + "lock:repair"  # redis-py lock: one repair at a time
# hash: what the last repair found and did (REPAIR_FIELDS: its figures), and when; per kind of
# REPAIR_KINDS, `repairs_<kind>` counts the repairs that found it; `set_aside_total` the files
# every repair set aside
REPAIRS = PREFIX + "repairs"
# What a repair found: nothing behind (a server restarted without loss), a state behind the
# spool's, or none at all.
REPAIR_KINDS = ("clean", "behind", "empty")
REPAIR_FIELDS = ("last_at", "last_kind", "last_run_id", "batches_restored", "batches_resplit",
                 "batches_finished", "pieces_retired", "files_sealed", "sealed_registered", "sealed_dropped",
                 "marks_raised", "set_aside")

# --- partition marks (sluice.handover.marks) --------------------------------------------------------
# Hashes keyed by `partition_field(topic, partition)`.
HWM = PREFIX + "hwm"  # -> last offset handed over
FINGERPRINT = PREFIX + "hwm:fingerprint"  # -> fingerprint of the record at that offset
INCARNATION = PREFIX + "hwm:incarnation"  # -> incarnation number of the topic
EARLIER = PREFIX + "hwm:earlier"  # -> records handed over by earlier incarnations

# --- batches in flight (sluice.handover.batches) ----------------------------------------------------
INFLIGHT = PREFIX + "inflight"  # sorted set: batch id, scored by hand-over (or redrive) time
INFLIGHT_BYTES = PREFIX + "inflight:bytes"  # string: bytes of all batches in flight
BATCH_BYTES = PREFIX + "inflight:batch-bytes"  # hash: batch id -> its share of INFLIGHT_BYTES
# sorted set: batch id, scored by the Kafka timestamp (ms) of its first record
INFLIGHT_OLDEST = PREFIX + "inflight:oldest"

# --- slot files (sluice.slots.appends, sluice.slots.sealing, sluice.slots.sealed) ------------------------------
SLOTS = PREFIX + "slots"  # set of slot ids that have a state hash
SEALED = PREFIX + "sealed"  # hash: sealed entry -> committed size, until archived
UPLOAD_PLAN = PREFIX + "upload-plan"  # hash: sealed entry -> upload plan
SLOT_STATE_PREFIX = PREFIX + "slot:"  # + slot id: hash fid, size, created, updated
SLOT_LOCK_PREFIX = PREFIX + "lock:"  # + slot id: string lease token, with a PX expiry
SEALED_RECORDS = PREFIX + "sealed:records"  # hash: sealed entry -> records in it
# sorted set: slot id or sealed entry, scored by the Kafka timestamp (ms) of the oldest record
# in it (of its batch's first record): what is compressed and not yet archived
PENDING_OLDEST = PREFIX + "pending:oldest"

# The pseudo-app whose slots hold the long tail: small pieces of many apps of one hour share a
# tail file (sluice.archive.tail). Not a valid app id (sluice.formats.records.APP_ID_PATTERN), so never a real app.
TAIL_APP = "~tail"

# --- uploads (sluice.archive.uploader, sluice.archive.tail, tasks.upload) --------------------------------------
# hash: hour -> the fids of the sealed tail files being archived together, comma-separated
TAIL_PLAN = PREFIX + "tail-plan"
# hash: hour -> how many times its tail files were archived (after the first, apps' objects of
# that hour may exist to merge into)
TAIL_ROUNDS = PREFIX + "tail-rounds"
SWEEP_LOCK = PREFIX + "lock:sweep"  # redis-py lock: one seal-and-upload sweep at a time
UPLOAD_LOCK_PREFIX = PREFIX + "lock:upload:"  # + app-hour: redis-py lock of one app-hour's upload
UPLOAD_QUEUED_PREFIX = PREFIX + "upload-queued:"  # + app-hour: id of its last upload task

# --- monitoring (sluice.ops.monitoring) ------------------------------------------------------------
COUNTERS = PREFIX + "counters"  # hash: a Counter name -> value, pipeline-wide, ever
QUARANTINED = PREFIX + "stats:quarantined"  # hash: reason -> records sent to quarantine
ARCHIVED_RECORDS = PREFIX + "stats:archived-records"  # hash: app -> records archived
ARCHIVED_BYTES = PREFIX + "stats:archived-bytes"  # hash: app -> compressed bytes archived
# + YYYYMMDDHH: hash app -> records appended that hour; the apps of tail pieces together as TAIL_APP
HOURLY_PREFIX = PREFIX + "stats:hour:"
HOURLY_TTL_SECONDS = 3 * 3600


class Counter(str, enum.Enum):
    """The fields of COUNTERS."""

    UPLOADS_OK = "uploads_ok"  # sealed files archived
    UPLOADS_FAILED = "uploads_failed"  # attempts that failed (a file may fail several times)
    UPLOADED_BYTES = "uploaded_bytes"
    REDRIVES = "redrives"
    RECORDS_APPENDED = "records_appended"  # to slot files (compressed, fetchable), quarantine included
    LAST_UPLOAD = "last_upload"  # epoch seconds of the last file archived


def hourly_records(hour: str) -> str:
    """Hash app -> records appended in that wall-clock hour (YYYYMMDDHH); expires."""
    return HOURLY_PREFIX + hour


# How long a queued-task note lives: the broker's visibility timeout (tasks.app), after which
# the broker hands a dead worker's reserved task out again anyway.
QUEUED_TTL_SECONDS = 3600


class BatchState(str, enum.Enum):
    """A batch's state key: handed over by the bridge, then split into pieces; gone when every
    piece is appended."""

    HANDED = "handed"
    SPLIT = "split"


# --- per-batch keys --------------------------------------------------------------------------
def batch_state(bid: str) -> str:
    """String: a BatchState value."""
    return f"{PREFIX}b:{bid}:state"


def batch_payload(bid: str) -> str:
    """String: the batch's Kafka record batches (claim check in Redis only)."""
    return f"{PREFIX}b:{bid}:payload"


def batch_groups(bid: str) -> str:
    """Hash: app-hour -> piece ref, for every piece not yet appended."""
    return f"{PREFIX}b:{bid}:groups"


def batch_pending(bid: str) -> str:
    """Set: app-hours of the batch not yet appended."""
    return f"{PREFIX}b:{bid}:pending"


def batch_queued(bid: str) -> str:
    """Set: ids of the batch's tasks sent and not yet started (expires after QUEUED_TTL_SECONDS)."""
    return f"{PREFIX}b:{bid}:queued"


# --- per-slot and per-app-hour keys ------------------------------------------------------------
def slot_state(sid: str) -> str:
    return SLOT_STATE_PREFIX + sid


def slot_lock(sid: str) -> str:
    return SLOT_LOCK_PREFIX + sid


def upload_lock(app: str, hour: str) -> str:
    return UPLOAD_LOCK_PREFIX + app_hour(app, hour)


def upload_queued(app: str, hour: str) -> str:
    return UPLOAD_QUEUED_PREFIX + app_hour(app, hour)


# --- formats of names and fields ---------------------------------------------------------------
# App ids and hours never hold "|" or ":" (sluice.formats.records.APP_ID_PATTERN, YYYYMMDDHH), so
# these names split back unambiguously.
def partition_field(topic: str, partition: int) -> str:
    """The field of a partition in the mark hashes: "topic:partition"."""
    return f"{topic}:{partition}"


def parse_partition_field(name: str) -> tuple[str, int]:
    topic, partition = name.rsplit(":", 1)
    return topic, int(partition)


def app_hour(app: str, hour: str) -> str:
    """"app|hour": the name of a batch piece (the lines of one app-hour in one batch)."""
    return f"{app}|{hour}"


def parse_app_hour(name: str) -> tuple[str, str]:
    app, hour = name.split("|")
    return app, hour


def slot_id(app: str, hour: str, k: int) -> str:
    """"app|hour|k": slot k (0..N-1) of an app-hour. The scripts build it as stem .. '|' .. k."""
    return f"{app}|{hour}|{k}"


def parse_slot_id(sid: str) -> tuple[str, str, int]:
    app, hour, k = sid.split("|")
    return app, hour, int(k)


def sealed_entry(app: str, hour: str, fid: str) -> str:
    """"app|hour|fid": a sealed file in SEALED and UPLOAD_PLAN. A fid is "<hour>-<16 hex>"."""
    return f"{app}|{hour}|{fid}"


def parse_sealed_entry(entry: str) -> tuple[str, str, str]:
    app, hour, fid = entry.split("|")
    return app, hour, fid


def new_fid(hour: str, unique: str) -> str:
    """A slot file id: its hour and a random part, never reused."""
    return f"{hour}-{unique}"


# An upload plan (UPLOAD_PLAN): NEW_OBJECT, or "<object key>|<its size>" to merge into.
NEW_OBJECT = "new"


def merge_plan(key: str, size: int) -> str:
    return f"{key}|{size}"


def parse_plan(plan: str) -> tuple[str, int] | None:
    """(object key, size) to merge into, or None for NEW_OBJECT."""
    if plan == NEW_OBJECT:
        return None
    key, size = plan.rsplit("|", 1)
    return key, int(size)


class PieceRef(NamedTuple):
    """Where a piece lies in its batch's pieces file, its lines, and the event-time span of
    its lines in ms (None in refs written before counts or spans were kept)."""

    token: str
    offset: int
    length: int
    records: int | None
    span: tuple[int, int] | None


def piece_ref(token: str, offset: int, length: int, records: int, span: tuple[int, int] | None = None) -> str:
    """BATCH_GROUPS values: "token:offset:length:records[:min_ms:max_ms]"."""
    ref = f"{token}:{offset}:{length}:{records}"
    return f"{ref}:{span[0]}:{span[1]}" if span is not None else ref


def parse_piece_ref(ref: bytes | str) -> PieceRef:
    text = ref.decode() if isinstance(ref, bytes) else ref
    token, offset, length, *rest = text.split(":")
    records = int(rest[0]) if rest else None
    span = (int(rest[1]), int(rest[2])) if len(rest) >= 3 else None
    return PieceRef(token, int(offset), int(length), records, span)


def piece_id(bid: str, piece: str) -> str:
    """"bid|app|hour": the id a frame is announced with in the archives (sluice.formats.frames), unique
    across every batch, so a reader that meets a piece twice prints it once."""
    return f"{bid}|{piece}"


def parse_piece_id(ident: str, tail: bool) -> tuple[str, str]:
    """(batch id, piece name) of an announced frame's id: `piece_id`'s "bid|app|hour", or a tail
    frame's "bid|hour" (`tail`), whose piece is the hour's tail piece."""
    if tail:
        bid, hour = ident.rsplit("|", 1)
        return bid, app_hour(TAIL_APP, hour)
    bid, app, hour = ident.rsplit("|", 2)
    return bid, app_hour(app, hour)


def batch_id(topic: str, partition: int, first: int, last: int, incarnation: int = 0) -> str:
    """"topic:partition:first-last[@incarnation]". Deterministic, so a replay is recognisable;
    a recreated topic's batches carry its incarnation, so they never meet the old ones' ids."""
    suffix = f"@{incarnation}" if incarnation else ""
    return f"{topic}:{partition}:{first}-{last}{suffix}"


def parse_batch_id(bid: str) -> tuple[str, int, int, int]:
    """(topic, partition, first offset, last offset)."""
    topic, partition, span = bid.rsplit(":", 2)
    first, last = span.partition("@")[0].split("-")
    return topic, int(partition), int(first), int(last)


# Every key sluice writes, as patterns: the contract test checks the keys a pipeline leaves or
# uses against them. Celery's own keys (queues, unacked, kombu bindings) are not sluice's.
_ID = r"[^|:]+"
_BID = r".+:\d+:\d+-\d+(@\d+)?"
_APP_HOUR = rf"{_ID}\|\d{{10}}"
KEY_PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p) for p in (
    re.escape(HWM), re.escape(FINGERPRINT), re.escape(INCARNATION), re.escape(EARLIER),
    re.escape(INFLIGHT), re.escape(INFLIGHT_BYTES), re.escape(BATCH_BYTES),
    re.escape(INFLIGHT_OLDEST), re.escape(SEALED_RECORDS), re.escape(PENDING_OLDEST),
    re.escape(COUNTERS), re.escape(QUARANTINED), re.escape(ARCHIVED_RECORDS), re.escape(ARCHIVED_BYTES),
    rf"{re.escape(HOURLY_PREFIX)}\d{{10}}",
    re.escape(SLOTS), re.escape(SEALED), re.escape(UPLOAD_PLAN), re.escape(SWEEP_LOCK), re.escape(SCHEMA_VERSION),
    re.escape(TAIL_PLAN), re.escape(TAIL_ROUNDS), re.escape(VERIFIED), re.escape(REPAIR_LOCK),
    re.escape(REPAIRS),
    rf"{re.escape(PREFIX)}b:{_BID}:(state|payload|groups|pending|queued)",
    rf"{re.escape(SLOT_STATE_PREFIX)}{_APP_HOUR}\|\d+",
    rf"{re.escape(SLOT_LOCK_PREFIX)}{_APP_HOUR}\|\d+",
    rf"{re.escape(UPLOAD_LOCK_PREFIX)}{_APP_HOUR}",
    rf"{re.escape(UPLOAD_QUEUED_PREFIX)}{_APP_HOUR}",
))


def is_schema_key(key: str) -> bool:
    """Whether a key under PREFIX is one this module defines."""
    return any(p.fullmatch(key) for p in KEY_PATTERNS)
