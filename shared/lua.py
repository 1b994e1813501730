"""Lua scripts that make each multi-key state change atomic in Redis."""

from __future__ import annotations

# KEYS[1] batch hash, KEYS[2] active-batches zset, KEYS[3] metrics counters hash.
# ARGV: to_status, now, timestamp_field ("" for none), terminal ("1"/"0"), batch_id, n_from, from..., then
# field/value pairs to set with the move. Returns {1, previous} when moved, {0, current} when not.
TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
local n_from = tonumber(ARGV[6])
local allowed = false
for i = 1, n_from do
  if ARGV[6 + i] == status then allowed = true end
end
if not allowed then return {0, status} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[2]) end
local i = 7 + n_from
while i < #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[5])
  redis.call('HINCRBY', KEYS[3], 'batches_finished|' .. ARGV[1], 1)
end
return {1, status}
"""

# KEYS[1] done set, KEYS[2] counts hash, KEYS[3] progress hash. ARGV: chunk index, counts json, n_chunks.
# The first commit of a chunk wins; a re-run's commit is a no-op. Returns {committed, done_count, n_chunks}.
COMMIT_CHUNK = """
local committed = 0
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[1])
  committed = 1
end
return {committed, redis.call('SCARD', KEYS[1]), tonumber(ARGV[3])}
"""

# KEYS[1] done set, KEYS[2] progress hash. ARGV: chunk index, completed, failed.
# Progress only moves forward, so a chunk that runs again never shows its requests twice.
SET_PROGRESS = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
local cur = redis.call('HGET', KEYS[2], ARGV[1])
local new_total = tonumber(ARGV[2]) + tonumber(ARGV[3])
if cur then
  local c, f = string.match(cur, '(%d+):(%d+)')
  if tonumber(c) + tonumber(f) >= new_total then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
"""

# KEYS[1] lease key. ARGV: token, ttl_ms. Renews only a lease this holder still owns.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
