"""Redis may forget: its state checked against the spool, and mended from it, before anyone acts
on it again.

A managed Redis persists once a second and fails over to an asynchronously replicated replica, so
a crash or a failover loses the last seconds of writes it acknowledged; a mistaken FLUSHALL or a
new instance loses all of them. What those writes recorded is still true on the spool, which
every step writes (and fsyncs) before Redis refers to it:

- a batch payload (`batches/<bid>.kafka`) stays until the batch's last piece is committed, so a
  payload on the spool is a batch in flight; its id carries its offsets (the partition's mark);
- a slot file's frames each announce their piece (`bid|app|hour`, or `bid|hour` for a tail
  piece), so whatever whole frames lie in a slot file, past the size Redis remembers or not,
  name the pieces already appended;
- a sealed file is removed from `sealed/` only once its object is stored whole, and a file is
  uploaded only once no batch it holds a piece of is in flight (sluice.archive.uploader), so the
  pieces of a batch in flight are all in the spool, never only in the store.

Every script that changes the state refuses (sluice.core.scripts.GUARD) until `schema.VERIFIED`
holds the run id of the server answering: a restarted server, a promoted replica and an emptied
one all fail that check at their first write. The process that meets the refusal first runs
the repair under `schema.REPAIR_LOCK` (`ensure_verified`); the others wait for it. The repair
seals every open slot file at its last whole frame (a slot's size Redis may have forgotten or
rolled back is never trusted again), rebuilds the sealed-file registry from `sealed/`, restores
the batches whose payloads lie in the spool (split again where Redis forgot the split), retires
every piece found in a slot file, finishes batches with none left, raises each partition's mark
over what the spool shows was handed over (so a replay from Kafka's committed offsets is trimmed),
and records what it did (`schema.REPAIRS`). Lease and fencing tokens are random, never counters,
so none issued before the loss can repeat one issued after. What cannot be accounted for is moved
to `set-aside/` in the spool and reported, never deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import zstandard

from sluice.core import schema, scripts
from sluice.core.errors import Damaged, FileBusy
from sluice.core.protocol import SCHEMA_MAJOR, SCHEMA_MINOR
from sluice.core.redis_client import server_time
from sluice.core.schema import BatchState
from sluice.core.settings import Settings
from sluice.formats.frames import PIECE_MAGIC, TAIL_MAGIC, units
from sluice.formats.records import Router
from sluice.formats.spool import FileRange, SealedFile, Spool, locked_file
from sluice.handover.batch_files import BatchFiles
from sluice.handover.batches import Batches
from sluice.handover.split import split_batch

log = logging.getLogger(__name__)

# How long a process waits for another one's repair before it gives up (its task retries).
WAIT_SECONDS = 120.0
# The repair lock's lease: longer than a repair of a large spool takes.
LEASE_SECONDS = 300.0
# A writer holds a slot file's lock for one append; a repair waits this long for it.
FILE_WAIT_SECONDS = 5.0


def unverified(exc: BaseException) -> bool:
    """Whether a Redis error is a script's refusal to act on a state not yet checked."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(scripts.UNVERIFIED)


def require_verified(client: redis.Redis) -> None:
    """Raise the guard's refusal (a redis.ResponseError that `unverified` knows) unless the state
    is checked: for a process about to act on what it reads (a sweep, an upload)."""
    client.register_script(scripts.CHECK)()


def verified(client: redis.Redis) -> bool:
    """Whether this server's state has been checked against the spool."""
    with client.pipeline(transaction=False) as pipe:
        pipe.info("server")
        pipe.get(schema.VERIFIED)
        info, mark = pipe.execute()
    return mark is not None and mark.decode() == str(info["run_id"])


@dataclass
class Report:
    """What a repair found and did; `resend`: the batches in flight, whose split to send again."""

    kind: str = "clean"  # "clean" (nothing was behind), "behind" or "empty"
    batches_restored: int = 0
    batches_resplit: int = 0
    batches_finished: int = 0
    pieces_retired: int = 0
    files_sealed: int = 0
    sealed_registered: int = 0
    sealed_dropped: int = 0
    marks_raised: int = 0
    set_aside: list[str] = field(default_factory=list)
    resend: list[str] = field(default_factory=list)

    def changed(self) -> bool:
        return any((self.batches_restored, self.batches_resplit, self.batches_finished, self.pieces_retired,
                    self.sealed_registered, self.sealed_dropped, self.marks_raised, self.set_aside))


@dataclass
class _SlotFile:
    app: str
    hour: str
    fid: str
    path: Path
    end: int = 0  # where its last whole frame ends
    records: int = 0
    oldest_ms: int | None = None
    pieces: list[tuple[str, str]] = field(default_factory=list)  # (batch id, piece name)


def ensure_verified(client: redis.Redis, settings: Settings, router: Router) -> Report | None:
    """Repair this server's state unless it is checked already; wait while another process
    repairs it. The report of the repair this call ran, None if it ran none."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not verified(client):
        lock = client.lock(schema.REPAIR_LOCK, timeout=LEASE_SECONDS, blocking=False)
        if lock.acquire():
            try:
                if not verified(client):
                    return Repair(client, settings, router).run()
            finally:
                with contextlib.suppress(redis.exceptions.LockError):
                    lock.release()
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis's state was not repaired within {WAIT_SECONDS:.0f}s")
        time.sleep(0.2)
    return None


class Repair:
    """One repair of Redis's state from the spool; `run` it while holding schema.REPAIR_LOCK."""

    def __init__(self, client: redis.Redis, settings: Settings, router: Router) -> None:
        self.r = client
        self.settings = settings
        self.router = router
        self.spool = Spool(settings.spool_dir)
        self.files = BatchFiles(settings.spool_dir)
        self.batches = Batches(client, settings, guarded=False)
        self.report = Report()

    def run(self) -> Report:
        started = time.monotonic()
        run_id = str(self.r.info("server")["run_id"])
        # No trace of any check: a new (or emptied) Redis; else one restarted or promoted.
        empty = not self.r.exists(schema.VERIFIED, schema.REPAIRS)
        self.r.set(schema.SCHEMA_VERSION, f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}", nx=True)
        log.warning("Redis server %s %s: its state is checked against the spool before anything acts on it",
                    run_id[:12], "holds no sluice state" if empty else "has not been checked since it started")
        self._seal_open_files()
        files = [self._scan(path, sealed=True) for path in self._slot_paths("sealed")]
        self._registry(files)
        self._batches({piece for f in files for piece in f.pieces})
        self.report.kind = "clean" if not self.report.changed() else "empty" if empty else "behind"
        self._record(run_id)
        self.r.register_script(scripts.MARK_VERIFIED)(keys=[schema.VERIFIED])
        log.warning("Redis state repaired from the spool in %.1fs (%s): %s", time.monotonic() - started,
                    self.report.kind, {k: v for k, v in vars(self.report).items() if k != "resend" and v})
        return self.report

    # --- slot files ----------------------------------------------------------------------
    def _slot_paths(self, tree: str) -> list[Path]:
        return sorted((self.spool.root / tree).glob("*/*/*.jsonl.zst"))

    def _scan(self, path: Path, sealed: bool, fd: int | None = None) -> _SlotFile:
        """A slot file's whole frames: where the last ends, their pieces, records and oldest time.
        Only the last frame can be torn (each append starts where a committed one ends), so it
        alone is decompressed to check it."""
        app, hour, fid = path.parent.parent.name, path.parent.name, path.name.removesuffix(".jsonl.zst")
        found = _SlotFile(app, hour, fid, path)
        own = fd is None
        if own:
            fd = os.open(path, os.O_RDONLY)
        assert fd is not None
        try:
            size = os.fstat(fd).st_size
            stream = FileRange(fd, 0, size)
            last = None
            try:
                for unit in units(stream):
                    last = (found.end, unit)
                    found.end = stream.pos
                    if unit.meta is not None:
                        found.records += unit.meta.records
                        if found.oldest_ms is None or unit.meta.min_ms < found.oldest_ms:
                            found.oldest_ms = unit.meta.min_ms
                    if unit.ident is not None and unit.magic in (PIECE_MAGIC, TAIL_MAGIC):
                        found.pieces.append(_piece_of(unit.ident, unit.magic))
            except Damaged:
                pass  # a torn frame at the end: the whole frames before it count
            if last is not None and not sealed:
                try:
                    zstandard.ZstdDecompressor().decompress(last[1].frame)
                except zstandard.ZstdError:
                    found.end = last[0]
                    if found.pieces and last[1].magic in (PIECE_MAGIC, TAIL_MAGIC):
                        found.pieces.pop()
        finally:
            if own:
                os.close(fd)
        return found

    def _seal_open_files(self) -> None:
        """Every open slot file sealed at its last whole frame, its slot's state dropped: what
        Redis remembers of a slot's size may be behind what was committed, never ahead."""
        busy: set[str] = set()
        for path in self._slot_paths("open"):
            try:
                with locked_file(path, wait=FILE_WAIT_SECONDS) as fd:
                    found = self._scan(path, sealed=False, fd=fd)
                    if found.end == 0:
                        if os.fstat(fd).st_size:  # bytes, but no whole announced frame: not ours to cut
                            self._set_aside(path, "an open slot file without a whole announced frame")
                        else:
                            path.unlink()
                        continue
                    self.spool.finish_seal(SealedFile(found.app, found.hour, found.fid, found.end), fd)
                    self.report.files_sealed += 1
            except FileBusy:
                busy.add(path.name.removesuffix(".jsonl.zst"))
                log.warning("repair: %s is locked by another process (frozen?); left open with its slot", path)
            except FileNotFoundError:
                continue
        for key in self.r.scan_iter(match=schema.SLOT_STATE_PREFIX + "*", count=1000):
            sid = key.decode().removeprefix(schema.SLOT_STATE_PREFIX)
            fid = self.r.hget(key, "fid")
            if fid is not None and fid.decode() in busy:
                continue
            with self.r.pipeline(transaction=False) as pipe:
                pipe.delete(key, schema.slot_lock(sid))
                pipe.srem(schema.SLOTS, sid)
                pipe.zrem(schema.PENDING_OLDEST, sid)
                pipe.execute()
        for sid in self.r.smembers(schema.SLOTS):
            if not self.r.exists(schema.slot_state(sid.decode())):
                self.r.srem(schema.SLOTS, sid)

    def _registry(self, files: list[_SlotFile]) -> None:
        """The sealed-file registry is what `sealed/` holds: an entry whose file is gone was
        archived (a file leaves `sealed/` only once its object is stored whole)."""
        on_disk = {schema.sealed_entry(f.app, f.hour, f.fid): f for f in files if f.end > 0}
        present = {schema.sealed_entry(f.app, f.hour, f.fid) for f in files}  # unannounced ones too
        known = {entry.decode(): int(size) for entry, size in self.r.hgetall(schema.SEALED).items()}
        with self.r.pipeline(transaction=False) as pipe:
            for entry in set(known) - present:
                pipe.hdel(schema.SEALED, entry)
                pipe.hdel(schema.SEALED_RECORDS, entry)
                pipe.hdel(schema.UPLOAD_PLAN, entry)
                pipe.zrem(schema.PENDING_OLDEST, entry)
                self.report.sealed_dropped += 1
            for entry, f in on_disk.items():
                if known.get(entry) != f.end:
                    pipe.hset(schema.SEALED, entry, f.end)
                    pipe.hset(schema.SEALED_RECORDS, entry, f.records)
                    if f.oldest_ms is not None:
                        pipe.zadd(schema.PENDING_OLDEST, {entry: f.oldest_ms}, nx=True)
                    if entry not in known:
                        self.report.sealed_registered += 1
            pipe.execute()
        tails = {f.fid for f in files if f.app == schema.TAIL_APP}
        for hour, fids in self.r.hgetall(schema.TAIL_PLAN).items():
            if not set(fids.decode().split(",")) & tails:
                self.r.hdel(schema.TAIL_PLAN, hour)

    # --- batches -------------------------------------------------------------------------
    def _batches(self, appended: set[tuple[str, str]]) -> None:
        """Batches in flight as the spool shows them; each one's pieces found in slot files
        retired; the marks raised over every batch the spool shows was handed over."""
        payloads = self._payloads()
        known = {bid.decode() for bid in self.r.zrange(schema.INFLIGHT, 0, -1)}
        marks = {k.decode(): int(v) for k, v in self.r.hgetall(schema.HWM).items()}
        incarnations = {k.decode(): int(v) for k, v in self.r.hgetall(schema.INCARNATION).items()}
        # Every batch id the spool or Redis shows, by partition: a payload Redis does not know is
        # restored only if no other batch covers any of its offsets (else it is a leftover of a
        # hand-over that never ran, whose records another batch holds).
        others: dict[str, set[str]] = {}
        for bid in {b for b, _ in appended} | known | set(payloads):
            others.setdefault(_partition(bid), set()).add(bid)
        seen: dict[str, tuple[int, int]] = {}  # partition field -> (incarnation, last offset) handed over
        for bid in sorted(payloads, key=_offsets):
            try:
                self._payload(bid, payloads[bid], marks, incarnations, others, appended)
            except (Damaged, ValueError, OSError) as exc:
                others[_partition(bid)].discard(bid)
                if bid not in known:
                    self._drop_state(bid)  # restored by this repair: not in flight after all
                self._set_aside(payloads[bid], f"its batch could not be repaired: {type(exc).__name__}: {exc}")
        for bid in known - set(payloads):
            self._without_payload(bid, appended)
        for name, bids in others.items():
            for bid in bids:
                if (_incarnation(bid), _last(bid)) > seen.get(name, (-1, -1)):
                    seen[name] = (_incarnation(bid), _last(bid))
        self._raise_marks(seen, marks, incarnations)
        self._recount_inflight()
        self.report.resend = [bid.decode() for bid in self.r.zrange(schema.INFLIGHT, 0, -1)]

    def _payload(self, bid: str, path: Path, marks: dict[str, int], incarnations: dict[str, int],
                 others: dict[str, set[str]], appended: set[tuple[str, str]]) -> None:
        """One batch whose payload lies in the spool: restored if Redis forgot it and no other
        batch holds its offsets (set aside if one does), split again if Redis forgot the split,
        its pieces found in slot files retired."""
        state = self.batches.state(bid)
        if state is None:
            name = _partition(bid)
            mark = marks.get(name, -1) if incarnations.get(name, 0) == _incarnation(bid) else -1
            if _incarnation(bid) < incarnations.get(name, 0) or _first(bid) <= mark or \
                    any(_overlap(bid, other) for other in others[name] if other != bid):
                others[name].discard(bid)
                self._set_aside(path, f"payload {bid} overlaps offsets handed over by other batches")
                return
            self._restore(bid, path)
            state = BatchState.HANDED
        if state == BatchState.HANDED:
            split_batch(self.batches, self.router, bid, self.settings.tail_piece_bytes)
            self.report.batches_resplit += 1
        self._retire(bid, appended)

    def _payloads(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in (self.spool.root / "batches").glob("*.kafka"):
            bid = path.name.removesuffix(".kafka")
            try:
                schema.parse_batch_id(bid)
            except ValueError:
                self._set_aside(path, "a payload whose name is not a batch id")
                continue
            found[bid] = path
        return found

    def _restore(self, bid: str, path: Path) -> None:
        """A batch handed over in writes Redis lost: in flight again, as handed over."""
        size = path.stat().st_size
        now = server_time(self.r)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(schema.batch_state(bid), BatchState.HANDED.value)
            pipe.zadd(schema.INFLIGHT, {bid: now})
            pipe.hset(schema.BATCH_BYTES, bid, size)
            pipe.zadd(schema.INFLIGHT_OLDEST, {bid: int(path.stat().st_mtime * 1000)})
            pipe.execute()
        self.report.batches_restored += 1

    def _retire(self, bid: str, appended: set[tuple[str, str]]) -> None:
        """Retire the pending pieces of a split batch found in slot files; split it again if the
        pieces Redis points at are gone; finish it if nothing is left."""
        pending = self.batches.pending_pieces(bid)
        refs = self.batches.r.hmget(schema.batch_groups(bid), pending) if pending else []
        tokens = {schema.parse_piece_ref(ref).token for ref in refs if ref is not None}
        if any(not self.files.pieces_path(bid, token).exists() for token in tokens) or \
                (pending and len(tokens) == 0):
            # Redis points at a pieces file that is gone: split the batch again from its payload.
            self.r.delete(schema.batch_groups(bid), schema.batch_pending(bid))
            self.r.set(schema.batch_state(bid), BatchState.HANDED.value)
            split_batch(self.batches, self.router, bid, self.settings.tail_piece_bytes)
            self.report.batches_resplit += 1
            pending = self.batches.pending_pieces(bid)
        done = [piece for piece in pending if (bid, piece) in appended]
        if done:
            with self.r.pipeline(transaction=True) as pipe:
                pipe.srem(schema.batch_pending(bid), *done)
                pipe.hdel(schema.batch_groups(bid), *done)
                pipe.execute()
            self.report.pieces_retired += len(done)
        if not self.r.scard(schema.batch_pending(bid)):
            self._finish(bid)

    def _without_payload(self, bid: str, appended: set[tuple[str, str]]) -> None:
        """A batch Redis has in flight whose payload the spool no longer holds: finished in
        writes Redis lost (or split by a release that dropped payloads at the split)."""
        if self.settings.claim_check == "redis":
            return
        state = self.batches.state(bid)
        pending = self.batches.pending_pieces(bid)
        if state == BatchState.SPLIT:
            refs = self.r.hmget(schema.batch_groups(bid), pending) if pending else []
            tokens = {schema.parse_piece_ref(ref).token for ref in refs if ref is not None}
            if tokens and all(self.files.pieces_path(bid, token).exists() for token in tokens):
                self._retire(bid, appended)  # its pieces are still to be appended
                return
        missing = [piece for piece in pending if (bid, piece) not in appended]
        if missing:
            self.report.set_aside.append(f"batch {bid}: pieces {missing} neither in a slot file nor in the spool")
            log.warning("repair: batch %s has pieces %s in no slot file and no payload to split them from; "
                        "left in flight for an operator", bid, missing)
            return
        self._finish(bid)

    def _finish(self, bid: str) -> None:
        self._drop_state(bid)
        self.files.drop_pieces(bid)
        self.files.drop_payload(bid)
        self.report.batches_finished += 1

    def _drop_state(self, bid: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(schema.batch_state(bid), schema.batch_groups(bid), schema.batch_pending(bid),
                        schema.batch_payload(bid))
            pipe.zrem(schema.INFLIGHT, bid)
            pipe.zrem(schema.INFLIGHT_OLDEST, bid)
            pipe.hdel(schema.BATCH_BYTES, bid)
            pipe.execute()

    def _raise_marks(self, seen: dict[str, tuple[int, int]], marks: dict[str, int],
                     incarnations: dict[str, int]) -> None:
        """Each partition's mark at least the last offset the spool shows handed over, in the
        latest incarnation it shows: Kafka's replay from its committed offsets is trimmed."""
        for name, (inc, last) in seen.items():
            current = incarnations.get(name, 0)
            if inc > current:
                self.r.hset(schema.INCARNATION, name, inc)
                self.r.hset(schema.HWM, name, last)
                self.r.hdel(schema.FINGERPRINT, name)
                self.report.marks_raised += 1
            elif inc == current and last > marks.get(name, -1):
                self.r.hset(schema.HWM, name, last)
                self.r.hdel(schema.FINGERPRINT, name)  # not known for this record: no incarnation check
                self.report.marks_raised += 1

    def _recount_inflight(self) -> None:
        sizes = self.r.hgetall(schema.BATCH_BYTES)
        inflight = {bid.decode() for bid in self.r.zrange(schema.INFLIGHT, 0, -1)}
        for bid in {b.decode() for b in sizes} - inflight:
            self.r.hdel(schema.BATCH_BYTES, bid)
        self.r.set(schema.INFLIGHT_BYTES, sum(int(v) for b, v in sizes.items() if b.decode() in inflight))

    # --- what cannot be accounted for ------------------------------------------------------
    def _set_aside(self, path: Path, why: str) -> None:
        """Move a file the repair cannot account for out of the pipeline's way; never delete it."""
        dst = self.spool.root / "set-aside" / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), dst)
        self.report.set_aside.append(f"{path.name}: {why}")
        log.warning("repair: set aside %s (%s); it is kept in %s for an operator", path.name, why, dst.parent)

    def _record(self, run_id: str) -> None:
        r = self.report
        fields = {"last_at": server_time(self.r), "last_kind": r.kind, "last_run_id": run_id,
                  "batches_restored": r.batches_restored, "batches_resplit": r.batches_resplit,
                  "batches_finished": r.batches_finished, "pieces_retired": r.pieces_retired,
                  "files_sealed": r.files_sealed, "sealed_registered": r.sealed_registered,
                  "sealed_dropped": r.sealed_dropped, "marks_raised": r.marks_raised,
                  "set_aside": len(r.set_aside)}
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(schema.REPAIRS, mapping=fields)
            pipe.hincrby(schema.REPAIRS, f"repairs_{r.kind}", 1)
            pipe.hincrby(schema.REPAIRS, "set_aside_total", len(r.set_aside))
            pipe.execute()


def _piece_of(ident: str, magic: int) -> tuple[str, str]:
    """(batch id, piece name) of an announced frame."""
    return schema.parse_piece_id(ident, tail=magic == TAIL_MAGIC)


def _incarnation(bid: str) -> int:
    return int(bid.rsplit("@", 1)[1]) if "@" in bid else 0


def _partition(bid: str) -> str:
    topic, partition, _, _ = schema.parse_batch_id(bid)
    return schema.partition_field(topic, partition)


def _first(bid: str) -> int:
    return schema.parse_batch_id(bid)[2]


def _last(bid: str) -> int:
    return schema.parse_batch_id(bid)[3]


def _overlap(a: str, b: str) -> bool:
    """Whether two batches of one partition hold an offset in common (in the same incarnation)."""
    return _incarnation(a) == _incarnation(b) and _first(a) <= _last(b) and _first(b) <= _last(a)


def _offsets(bid: str) -> tuple[str, int, int]:
    return _partition(bid), _incarnation(bid), _first(bid)
