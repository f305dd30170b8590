"""Every Lua script sluice runs in Redis: each state change that must be atomic is one of these.

Times the scripts record (hand-over, a slot's creation and last append, the last upload) are Redis's
own clock (TIME), so a host whose clock is off cannot make a file seal early or late, nor a batch
look stale, because of it.

Each script's header names its KEYS and ARGV. Key names come from sluice.core.schema: passed in KEYS,
or, where one script touches the slots of many app-hours (passing 2N key names per frame would
dominate the compress stage's Redis cost), built inside the script from the prefixes
`schema.SLOT_LOCK_PREFIX` and `schema.SLOT_STATE_PREFIX`, passed in ARGV, and the slot id format
`schema.slot_id` ("app|hour|k"). Fine on one Redis server, which is what sluice runs on; Redis
Cluster would need every key declared in KEYS.
"""

from __future__ import annotations

from string import Template

from sluice.core.schema import VERIFIED, BatchState, Counter

# Every script that changes the state begins with this: it refuses, with an error reply that
# begins with UNVERIFIED, unless the state was checked against the spool on this very server
# (schema.VERIFIED holds its run id). A Redis that lost its last writes or came back empty is a
# restarted server or a promoted replica, with another run id (or an emptied one, without the
# key), so nothing is appended, sealed, uploaded or handed over on the strength of a state that
# went back in time until sluice.ops.repair has mended it.
UNVERIFIED = "UNVERIFIED"
GUARD = f"""
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', '{VERIFIED}') ~= run_id then
  return redis.error_reply('{UNVERIFIED} Redis state not yet checked against the spool since this server started')
end
"""

# The batch states and counter names the scripts use, as sluice.core.schema names them.
_NAMES = {"handed": BatchState.HANDED.value, "split": BatchState.SPLIT.value, "guard": GUARD,
          **{f"counter_{c.name.lower()}": c.value for c in Counter}}

# The guard alone: a process checks it before it acts on what it read of the state (an upload,
# a sweep). 1, or the UNVERIFIED error.
CHECK = GUARD + "return 1\n"

# The end of a repair: this server's state is checked; its run id.
# KEYS: 1 VERIFIED
MARK_VERIFIED = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
redis.call('SET', KEYS[1], run_id)
return run_id
"""

# Hand a batch over: advance the partition's mark from ARGV[2] to ARGV[3], record the batch as
# handed and in flight. {0, current mark} if the mark moved since it was read, else {1, ''}.
# KEYS: 1 HWM, 2 INFLIGHT, 3 batch_state(bid), 4 batch_payload(bid), 5 FINGERPRINT,
#       6 INFLIGHT_BYTES, 7 BATCH_BYTES, 8 INFLIGHT_OLDEST
# ARGV: 1 partition field, 2 expected mark ('' for none), 3 new mark, 4 batch id,
#       5 '1' to store the payload in Redis, 6 payload, 7 fingerprint, 8 its share of the in-flight
#       bytes (Batches.in_flight_share),
#       9 Kafka timestamp (ms) of the batch's first record
HAND_OVER = Template("""
$guard
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return {0, cur} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[7])
if ARGV[5] == '1' then redis.call('SET', KEYS[4], ARGV[6]) end
redis.call('SET', KEYS[3], '$handed')
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('HSET', KEYS[7], ARGV[4], ARGV[8])
redis.call('INCRBY', KEYS[6], ARGV[8])
redis.call('ZADD', KEYS[8], ARGV[9], ARGV[4])
return {1, ''}
""").substitute(_NAMES)

# Start a new incarnation of a partition whose mark is still ARGV[2]; its new number, or -1.
# KEYS: 1 HWM, 2 FINGERPRINT, 3 EARLIER, 4 INCARNATION
# ARGV: 1 partition field, 2 expected mark ('' for none)
NEW_INCARNATION = GUARD + """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return -1 end
if cur ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[1], tonumber(cur) + 1) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
"""

# Record the pieces of a handed-over batch and mark it split, and count its quarantined records
# by reason; 0 if it was split already. The batch's share of the in-flight bytes, reserved at
# the hand-over for its payload and pieces about as large, becomes what they hold (both stay in
# the spool until the batch is done), so the backpressure bound holds over both.
# KEYS: 1 batch_state(bid), 2 batch_groups(bid), 3 batch_pending(bid), 4 batch_payload(bid),
#       5 QUARANTINED, 6 INFLIGHT_BYTES, 7 BATCH_BYTES
# ARGV: 1 batch id, 2 the bytes of its payload and its pieces, 3 R, then R pairs of a quarantine
#       reason and its count, then per piece its app-hour name and its piece ref
_SPLIT_COMMIT = Template("""
if redis.call('GET', KEYS[1]) ~= '$handed' then return 0 end
local share = redis.call('HGET', KEYS[7], ARGV[1])
if share then
  redis.call('HSET', KEYS[7], ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[6], tonumber(ARGV[2]) - tonumber(share))
end
local r = tonumber(ARGV[3])
for i = 4, 2 + 2 * r, 2 do
  redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1])
end
for i = 4 + 2 * r, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('SADD', KEYS[3], ARGV[i])
end
redis.call('SET', KEYS[1], '$split')
redis.call('DEL', KEYS[4])
return 1
""").substitute(_NAMES)
SPLIT_COMMIT = GUARD + _SPLIT_COMMIT
# The same, without the guard: only for sluice.ops.repair, which splits again what Redis forgot
# before the state is marked checked.
REPAIR_SPLIT_COMMIT = _SPLIT_COMMIT

# Release those of these slot locks that still hold our token.
# KEYS: slot_lock(sid) of each slot
# ARGV: 1 token
RELEASE = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
return 0
"""

# For each app-hour of a bundle, take its lowest free slot and return that slot's state,
# creating the state if the slot has none: {k, fid, size}, or {-1} for an app-hour whose N slots
# are all taken. A slot whose mark in the skip mask is '1' is passed over (its file is held by a
# frozen writer).
# KEYS: 1 SLOTS
# ARGV: 1 token, 2 lease ms, 3 N, 4 SLOT_LOCK_PREFIX, 5 SLOT_STATE_PREFIX, then per app-hour: its
#       app_hour name (the slot id stem), a new fid, a skip mask ('' for none)
ACQUIRE = GUARD + """
local token, lease, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lockp, slotp = ARGV[4], ARGV[5]
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local out = {}
for p = 0, (#ARGV - 5) / 3 - 1 do
  local stem, fid, skip = ARGV[6 + 3 * p], ARGV[7 + 3 * p], ARGV[8 + 3 * p]
  local got = {-1}
  for k = 1, n do
    local sid = stem .. '|' .. (k - 1)
    if string.sub(skip, k, k) ~= '1' and redis.call('SET', lockp .. sid, token, 'NX', 'PX', lease) then
      local slot = slotp .. sid
      local state = redis.call('HMGET', slot, 'fid', 'size')
      if state[1] then
        got = {k - 1, state[1], tonumber(state[2])}
      else
        redis.call('HSET', slot, 'fid', fid, 'size', 0, 'created', now, 'updated', now)
        redis.call('SADD', KEYS[1], sid)
        got = {k - 1, fid, 0}
      end
      break
    end
  end
  out[p + 1] = got
end
return out
"""

# Under the file locks, for each slot: its committed size if the lock is still ours and the
# slot still has the file we locked, -1 if the lease was lost, -2 if the slot moved on to
# another file (sealed meanwhile).
# KEYS: none (built from the prefixes)
# ARGV: 1 token, 2 SLOT_LOCK_PREFIX, 3 SLOT_STATE_PREFIX, then per slot its id and fid
VERIFY = GUARD + """
local token, lockp, slotp = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for p = 0, (#ARGV - 3) / 2 - 1 do
  local sid, fid = ARGV[4 + 2 * p], ARGV[5 + 2 * p]
  local state = redis.call('HMGET', slotp .. sid, 'fid', 'size')
  if state[1] ~= fid then
    out[p + 1] = -2
  elseif redis.call('GET', lockp .. sid) ~= token then
    out[p + 1] = -1
  else
    out[p + 1] = tonumber(state[2])
  end
end
return out
"""

# Commit the appends of a bundle: for each piece still pending, retire it, move the slot's
# committed size and release the lock, sealing the slot in the same step when it has grown past
# the seal size (2). A piece no longer pending (0: a duplicate delivery) keeps its lock, so its
# writer can cut its bytes off before anyone appends after them; -1: the lease was lost. The
# last piece of a batch takes the batch's bytes off the in-flight total, once; the last element
# of the reply says so (1), and the caller removes the batch's pieces files. The piece name
# ("app|hour") and the sealed entry ("app|hour|fid") are built from the slot id. Records are
# counted in all and to the slot's app in this hour's table: the apps of a tail piece together,
# as the tail (a count per app there was a Redis write per app per batch). A slot (then its sealed
# entry) is scored in PENDING_OLDEST by the oldest first-record timestamp of the batches
# appended to it, and counts its records.
# KEYS: 1 batch_pending(bid), 2 batch_groups(bid), 3 batch_state(bid), 4 INFLIGHT, 5 COUNTERS,
#       6 SEALED, 7 SLOTS, 8 INFLIGHT_BYTES, 9 BATCH_BYTES, 10 INFLIGHT_OLDEST,
#       11 PENDING_OLDEST, 12 SEALED_RECORDS, 13 hourly_records(this hour)
# ARGV: 1 token, 2 batch id, 3 seal size, 4 SLOT_LOCK_PREFIX, 5 SLOT_STATE_PREFIX,
#       6 HOURLY_TTL_SECONDS, 7 Counter.RECORDS_APPENDED, then per piece: slot id, fid, new
#       size, records
COMMIT = GUARD + """
local lockp, slotp = ARGV[4], ARGV[5]
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local oldest = redis.call('ZSCORE', KEYS[10], ARGV[2])
local out = {}
local appended = false
local a = 7
while a < #ARGV do
  local sid, fid, size, records = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 4
  local lock, slot = lockp .. sid, slotp .. sid
  local app, hour = string.match(sid, '^([^|]*)|([^|]*)|')
  local piece = app .. '|' .. hour
  local r = 1
  if redis.call('GET', lock) ~= ARGV[1] then
    r = -1
  elseif redis.call('SREM', KEYS[1], piece) == 0 then
    r = 0
  else
    redis.call('HSET', slot, 'size', size, 'updated', now)
    redis.call('HINCRBY', slot, 'records', records)
    redis.call('HDEL', KEYS[2], piece)
    redis.call('HINCRBY', KEYS[5], ARGV[7], records)
    redis.call('HINCRBY', KEYS[13], app, records)
    appended = true
    if oldest then redis.call('ZADD', KEYS[11], 'LT', oldest, sid) end
    if tonumber(size) >= tonumber(ARGV[3]) then
      local entry = piece .. '|' .. fid
      redis.call('HSET', KEYS[6], entry, size)
      redis.call('HSET', KEYS[12], entry, redis.call('HGET', slot, 'records'))
      local o = redis.call('ZSCORE', KEYS[11], sid)
      redis.call('ZREM', KEYS[11], sid)
      if o then redis.call('ZADD', KEYS[11], o, entry) end
      redis.call('DEL', slot)
      redis.call('SREM', KEYS[7], sid)
      r = 2
    end
    redis.call('DEL', lock)
  end
  out[#out + 1] = r
end
if appended then redis.call('EXPIRE', KEYS[13], ARGV[6]) end
local finished = 0
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[10], ARGV[2])
  if redis.call('ZREM', KEYS[4], ARGV[2]) == 1 then
    local bytes = redis.call('HGET', KEYS[9], ARGV[2])
    if bytes then redis.call('DECRBY', KEYS[8], bytes) end
    redis.call('HDEL', KEYS[9], ARGV[2])
    finished = 1
  end
end
out[#out + 1] = finished
return out
"""

# Seal a slot we hold the lock of: its file becomes a sealed entry (unless it is empty), with its
# record count and its place in PENDING_OLDEST; the slot loses its state. -1 if the lease was lost.
# KEYS: 1 slot_lock(sid), 2 slot_state(sid), 3 SEALED, 4 SLOTS, 5 SEALED_RECORDS, 6 PENDING_OLDEST
# ARGV: 1 token, 2 sealed entry, 3 committed size, 4 slot id
SEAL = GUARD + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local o = redis.call('ZSCORE', KEYS[6], ARGV[4])
redis.call('ZREM', KEYS[6], ARGV[4])
if tonumber(ARGV[3]) > 0 then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[5], ARGV[2], redis.call('HGET', KEYS[2], 'records') or 0)
  if o then redis.call('ZADD', KEYS[6], o, ARGV[2]) end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[4])
return 1
"""

# A sealed file is archived: it leaves the registry with its plan, and its records and bytes are
# counted as archived, once. 0 if it had left already.
# KEYS: 1 SEALED, 2 UPLOAD_PLAN, 3 SEALED_RECORDS, 4 PENDING_OLDEST, 5 ARCHIVED_RECORDS,
#       6 ARCHIVED_BYTES, 7 COUNTERS
# ARGV: 1 sealed entry, 2 its app
FORGET = Template("""
$guard
local size = redis.call('HGET', KEYS[1], ARGV[1])
if not size then return 0 end
local records = redis.call('HGET', KEYS[3], ARGV[1]) or 0
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[2], records)
redis.call('HINCRBY', KEYS[6], ARGV[2], size)
redis.call('HINCRBY', KEYS[7], '$counter_uploads_ok', 1)
redis.call('HINCRBY', KEYS[7], '$counter_uploaded_bytes', size)
local t = redis.call('TIME')
redis.call('HSET', KEYS[7], '$counter_last_upload', t[1] + t[2] / 1000000)
return 1
""").substitute(_NAMES)

# The sealed tail files of an hour are archived, as one object per app (sluice.archive.tail): they leave
# the registry, the hour's tail plan is dropped and its rounds counted; each app's records and
# bytes count as archived, and each object as an upload, once. 0 if they had left already.
# KEYS: 1 SEALED, 2 TAIL_PLAN, 3 SEALED_RECORDS, 4 PENDING_OLDEST, 5 ARCHIVED_RECORDS,
#       6 ARCHIVED_BYTES, 7 COUNTERS, 8 TAIL_ROUNDS
# ARGV: 1 hour, 2 n, then n sealed entries, then per object: its app, records, bytes
FORGET_TAIL = Template("""
$guard
local n = tonumber(ARGV[2])
local left = 0
for i = 3, 2 + n do
  left = left + redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('ZREM', KEYS[4], ARGV[i])
end
redis.call('HDEL', KEYS[2], ARGV[1])
if left == 0 then return 0 end
redis.call('HINCRBY', KEYS[8], ARGV[1], 1)
for i = 3 + n, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[6], ARGV[i], ARGV[i + 2])
  redis.call('HINCRBY', KEYS[7], '$counter_uploads_ok', 1)
  redis.call('HINCRBY', KEYS[7], '$counter_uploaded_bytes', ARGV[i + 2])
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[7], '$counter_last_upload', t[1] + t[2] / 1000000)
return 1
""").substitute(_NAMES)
