"""Lua scripts that make each multi-key state change atomic in Redis (key names come from shared/keys.py)."""

from __future__ import annotations

# A move of a batch's status with everything that goes with it (shared/lifecycle.py).
# KEYS: 1 batch hash, 2 active zset, 3 metric counters, 4 tenant usage hash, 5 usage tenants set, 6 webhook event
# hash, 7 pending webhooks zset, 8 clean-up outbox zset, 9 the scheduler's enqueued requests per tenant.
# ARGV: to, now, timestamp field, terminal (1/0), batch id, n_from, from..., n_fields, (name, value)..., and for a
# terminal move: tenant, 5 usage figures, completed, failed, event id ("" for none), event type, clean-up time,
# cost in micro-units, its currency ("" when the model has no price), the UTC day of the move (YYYY-MM-DD).
# The cost is added, saturating at 2^53-1, to the tenant's usage hash fields `cost_micros|CUR` and
# `cost_micros|CUR|DAY`, and to the metric counter `cost_micros|CUR|TENANT`.
# Returns {1, previous status} when moved, {0, current status} when not.
APPLY_MOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
local n_from = tonumber(ARGV[6])
local allowed = false
for i = 1, n_from do
  if ARGV[6 + i] == status then allowed = true end
end
if not allowed then return {0, status} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[2])
local i = 7 + n_from
local n_fields = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_fields do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if ARGV[4] == '1' then
  local batch_id = ARGV[5]
  redis.call('ZREM', KEYS[2], batch_id)
  redis.call('HINCRBY', KEYS[3], 'batches_finished|' .. ARGV[1], 1)
  local tenant = ARGV[i]
  local kinds = {'input_tokens', 'cached_tokens', 'output_tokens', 'reasoning_tokens', 'total_tokens'}
  for k = 1, 5 do
    local cur = tonumber(redis.call('HGET', KEYS[4], kinds[k]) or '0')
    local sum = math.min(cur + tonumber(ARGV[i + k]), 9007199254740991)
    redis.call('HSET', KEYS[4], kinds[k], string.format('%.0f', sum))
  end
  redis.call('HINCRBY', KEYS[4], 'requests_completed', ARGV[i + 6])
  redis.call('HINCRBY', KEYS[4], 'requests_failed', ARGV[i + 7])
  redis.call('HINCRBY', KEYS[4], 'batches', 1)
  redis.call('SADD', KEYS[5], tenant)
  local event_id = ARGV[i + 8]
  if event_id ~= '' and redis.call('HSETNX', KEYS[6], 'type', ARGV[i + 9]) == 1 then
    redis.call('HSET', KEYS[6], 'tenant', tenant, 'batch_id', batch_id, 'created_at', ARGV[2], 'attempts', '0')
    redis.call('ZADD', KEYS[7], ARGV[2], event_id)
  end
  redis.call('ZADD', KEYS[8], ARGV[i + 10], batch_id)
  local currency = ARGV[i + 12] or ''
  if currency ~= '' then
    local cost = tonumber(ARGV[i + 11]) or 0
    local sums = {{KEYS[4], 'cost_micros|' .. currency}, {KEYS[4], 'cost_micros|' .. currency .. '|' .. ARGV[i + 13]},
                  {KEYS[3], 'cost_micros|' .. currency .. '|' .. tenant}}
    for _, s in ipairs(sums) do
      local cur = tonumber(redis.call('HGET', s[1], s[2]) or '0') or 0
      redis.call('HSET', s[1], s[2], string.format('%.0f', math.min(cur + cost, 9007199254740991)))
    end
  end
  local admitted = tonumber(redis.call('HGET', KEYS[1], 'admitted') or '0') or 0
  if admitted > 0 then
    redis.call('HINCRBY', KEYS[9], tenant, -admitted)
    redis.call('HSET', KEYS[1], 'admitted', '0')
  end
end
return {1, status}
"""

# KEYS: 1 lease, 2 finished bitmap, 3 segments list, 4 progress hash, 5 done set.
# ARGV: token, chunk index, segment json, n_out, n_err, lease ms, position...
# Records a durable segment only for the lease holder of an uncommitted chunk, and only if none of its positions is
# durable already; renews the lease. Returns 1, or -1 (lease lost), -2 (chunk committed), -3 (position taken).
COMMIT_SEGMENT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('SISMEMBER', KEYS[5], ARGV[2]) == 1 then return -2 end
for i = 7, #ARGV do
  if redis.call('GETBIT', KEYS[2], ARGV[i]) == 1 then return -3 end
end
for i = 7, #ARGV do redis.call('SETBIT', KEYS[2], ARGV[i], 1) end
redis.call('RPUSH', KEYS[3], ARGV[3])
local c, f = 0, 0
local cur = redis.call('HGET', KEYS[4], ARGV[2])
if cur then
  local a, b = string.match(cur, '(%d+):(%d+)')
  c, f = tonumber(a), tonumber(b)
end
redis.call('HSET', KEYS[4], ARGV[2], (c + tonumber(ARGV[4])) .. ':' .. (f + tonumber(ARGV[5])))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

# KEYS: 1 lease, 2 progress hash, 3 done set. ARGV: token, chunk index, completed, failed.
# A new run sets its chunk's live progress to what earlier runs made durable (it never counts a line twice).
RESET_PROGRESS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ':' .. ARGV[4])
return 1
"""

# A sample of a batch's progress for its history (shared/progress.py), sent in the same pipeline as each segment and
# chunk commit. KEYS: 1 history list, 2 counts hash, 3 progress hash, 4 done set. ARGV: least gap between samples
# (ms), most samples kept, n_chunks (0, or the plan's size on a chunk commit: the last one is always sampled).
# Samples are "t_ms:completed:failed" at Redis's clock. The gap grows with the history's span (at least the span / half
# the cap), and a full history keeps every other sample, so it covers the whole run at an even density. Returns 1
# when a sample was taken.
SAMPLE_PROGRESS = """
local now = redis.call('TIME')
local t = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local cap = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local last_chunk = n > 0 and redis.call('SCARD', KEYS[4]) >= n
local len = redis.call('LLEN', KEYS[1])
if len > 0 and not last_chunk then
  local t0 = tonumber(string.match(redis.call('LINDEX', KEYS[1], 0), '^(%d+)'))
  local t1 = tonumber(string.match(redis.call('LINDEX', KEYS[1], -1), '^(%d+)'))
  if t - t1 < math.max(tonumber(ARGV[1]), (t1 - t0) * 2 / cap) then return 0 end
end
local c, f = 0, 0
for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do
  c = c + tonumber(string.match(raw, '"completed":(%d+)') or '0')
  f = f + tonumber(string.match(raw, '"failed":(%d+)') or '0')
end
for _, raw in ipairs(redis.call('HVALS', KEYS[3])) do
  local a, b = string.match(raw, '(%d+):(%d+)')
  c, f = c + tonumber(a), f + tonumber(b)
end
redis.call('RPUSH', KEYS[1], t .. ':' .. c .. ':' .. f)
if len + 1 > cap then
  local all = redis.call('LRANGE', KEYS[1], 0, -1)
  local kept = {}
  for i = 1, #all - 1, 2 do kept[#kept + 1] = all[i] end
  kept[#kept + 1] = all[#all]
  redis.call('DEL', KEYS[1])
  redis.call('RPUSH', KEYS[1], unpack(kept))
end
return 1
"""

# KEYS: 1 lease, 2 done set, 3 counts hash, 4 progress hash. ARGV: token, chunk index, counts json, n_chunks.
# The first commit of a chunk wins, and only its lease holder may make it. Returns {committed (1, 0 when committed
# already, -1 when the lease is lost), chunks done, n_chunks}.
COMMIT_CHUNK = """
local n = tonumber(ARGV[4])
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return {0, redis.call('SCARD', KEYS[2]), n} end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, redis.call('SCARD', KEYS[2]), n} end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[2])
return {1, redis.call('SCARD', KEYS[2]), n}
"""

# A running batch's requests not yet answered (the autoscaling signal, shared/store_sched.py pending_requests): the
# lines of every chunk not committed (released and waiting, or taken and running) less the lines its runs made
# durable so far. KEYS: 1 batch hash, 2 plan list, 3 done set, 4 progress hash. ARGV: the status counted
# (in_progress). Returns {provider, model, pending}, or nil for a batch in another status or forwarded whole to its
# provider (whose own batch API does the work). O(chunks of the batch).
PENDING_LINES = """
local f = redis.call('HMGET', KEYS[1], 'status', 'forward', 'provider', 'model')
if f[1] ~= ARGV[1] or f[2] == '1' then return false end
local done = {}
for _, i in ipairs(redis.call('SMEMBERS', KEYS[3])) do done[i] = true end
local pending = 0
for i, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if not done[tostring(i - 1)] then pending = pending + tonumber(string.match(raw, '(%d+)$')) end
end
for _, raw in ipairs(redis.call('HVALS', KEYS[4])) do
  local c, e = string.match(raw, '(%d+):(%d+)')
  pending = pending - tonumber(c) - tonumber(e)
end
if pending < 0 then pending = 0 end
return {f[3] or '', f[4] or '', pending}
"""

# KEYS[1] a bitmap. Returns it as hex (the store's client decodes replies as text).
BITMAP_HEX = """
local s = redis.call('GET', KEYS[1])
if not s then return '' end
local out = {}
for i = 1, #s do out[i] = string.format('%02x', string.byte(s, i)) end
return table.concat(out)
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

# KEYS[1] pending webhooks zset. ARGV: event id, now, claim seconds. A deliverer claims a due event by moving its
# due time past the attempt; a second deliverer (a duplicate message, the sweeper) then finds it not due.
CLAIM_EVENT = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# The scheduler (shared/store_sched.py). Tenants are served by weighted fair queuing: each has a virtual time that
# grows by the lines it is given divided by its weight, and the tenant with the least goes next; a tenant coming
# back from idle starts at the clock (the last virtual time served), so idleness is not saved up as credit.

# Release chunks of a batch to be run.
# KEYS: 1 tenants zset, 2 state hash, 3 the batch's ready list, 4 the tenant's batches zset.
# ARGV: batch id, tenant, weight, chunk index...
RELEASE_CHUNKS = """
local ready = redis.call('LRANGE', KEYS[3], 0, -1)
local have = {}
for _, idx in ipairs(ready) do have[idx] = true end
for i = 4, #ARGV do
  if not have[ARGV[i]] then
    redis.call('RPUSH', KEYS[3], ARGV[i])
    have[ARGV[i]] = true
  end
end
if redis.call('LLEN', KEYS[3]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'w:' .. ARGV[2], ARGV[3])
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  redis.call('ZADD', KEYS[4], redis.call('HINCRBY', KEYS[2], 'rr', 1), ARGV[1])
end
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  local vnow = tonumber(redis.call('HGET', KEYS[2], 'vnow') or '0')
  local last = tonumber(redis.call('HGET', KEYS[2], 'vt:' .. ARGV[2]) or '0')
  redis.call('ZADD', KEYS[1], math.max(vnow, last), ARGV[2])
end
return 1
"""

# Take the chunk to run next: the tenant with the least virtual time; within it a stopped batch first (its chunks
# only write their stop lines), then a batch near its deadline (less than `urgent` of its window left; earliest
# deadline first), then higher priority, then the batch with less time left by octaves (a 1 h batch before a 7 d one),
# then round robin.
# KEYS: 1 tenants zset, 2 state hash.
# ARGV: now, batch record prefix, ready suffix, plan suffix, tenant batches prefix, urgent fraction, terminal
# statuses (",a,b,"), candidates per tenant.
# Returns {batch id, chunk index, tenant} or false when nothing is ready.
TAKE_CHUNK = """
local now = tonumber(ARGV[1])
local urgent_fraction = tonumber(ARGV[6])
local function better(a, b)
  for i = 1, #a do
    if a[i] ~= b[i] then return a[i] < b[i] end
  end
  return false
end
for _ = 1, 32 do
  local top = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #top == 0 then return false end
  local tenant, vt = top[1], tonumber(top[2])
  local tkey = ARGV[5] .. tenant
  local cands = redis.call('ZRANGE', tkey, 0, tonumber(ARGV[8]) - 1, 'WITHSCORES')
  local best, best_key = nil, nil
  for i = 1, #cands, 2 do
    local bid = cands[i]
    local rec = ARGV[2] .. bid
    local f = redis.call('HMGET', rec, 'status', 'priority', 'expires_at', 'created_at', 'stop')
    if (not f[1]) or string.find(ARGV[7], ',' .. f[1] .. ',', 1, true)
        or redis.call('LLEN', rec .. ARGV[3]) == 0 then
      redis.call('ZREM', tkey, bid)
    else
      local expires = tonumber(f[3] or '0') or 0
      local window = math.max(1, expires - (tonumber(f[4] or '0') or 0))
      local slack = math.max(1, expires - now)
      local key
      if f[5] and f[5] ~= '' then
        key = {0, 0, 0, 0, tonumber(cands[i + 1])}
      elseif expires > 0 and slack < window * urgent_fraction then
        key = {1, expires, 0, 0, tonumber(cands[i + 1])}
      else
        key = {2, 0, -(tonumber(f[2] or '0') or 0), math.floor(math.log(slack) / math.log(2)), tonumber(cands[i + 1])}
      end
      if best == nil or better(key, best_key) then best, best_key = bid, key end
    end
  end
  if best == nil then
    -- Every candidate looked at was dead (and is gone now); the tenant leaves only when no batch of it is left.
    if redis.call('ZCARD', tkey) == 0 then
      redis.call('ZREM', KEYS[1], tenant)
      redis.call('HSET', KEYS[2], 'vt:' .. tenant, vt)
    end
  else
    local rec = ARGV[2] .. best
    local idx = redis.call('LPOP', rec .. ARGV[3])
    local n = 0
    if best_key[1] ~= 0 then
      local spec = redis.call('LINDEX', rec .. ARGV[4], tonumber(idx))
      if spec then n = tonumber(string.match(spec, '(%d+)$')) or 0 end
    end
    local weight = tonumber(redis.call('HGET', KEYS[2], 'w:' .. tenant) or '1') or 1
    local next_vt = vt + n / weight
    redis.call('HSET', KEYS[2], 'vnow', vt, 'taken_at', ARGV[1])
    if redis.call('LLEN', rec .. ARGV[3]) == 0 then
      redis.call('ZREM', tkey, best)
    else
      redis.call('ZADD', tkey, redis.call('HINCRBY', KEYS[2], 'rr', 1), best)
    end
    if redis.call('ZCARD', tkey) == 0 then
      redis.call('ZREM', KEYS[1], tenant)
      redis.call('HSET', KEYS[2], 'vt:' .. tenant, next_vt)
    else
      redis.call('ZADD', KEYS[1], next_vt, tenant)
    end
    return {best, idx, tenant}
  end
end
return false
"""

# Admit a tenant's waiting batches, first come first served, while they fit under its cap of enqueued requests.
# KEYS: 1 enqueued requests hash, 2 the tenant's waiting zset.
# ARGV: tenant, cap, batch record prefix, batch id asking to start ("" for none), its place in line, statuses that
# may wait (",a,b,").
# A batch asking joins the line; every batch admitted has `admitted` set to its total (given back by its terminal
# move). Returns the ids admitted (or already admitted, for the one asking).
ADMIT = """
local out = {}
if ARGV[4] ~= '' then
  local admitted = tonumber(redis.call('HGET', ARGV[3] .. ARGV[4], 'admitted') or '0') or 0
  if admitted > 0 then return {ARGV[4]} end
  redis.call('ZADD', KEYS[2], 'NX', ARGV[5], ARGV[4])
end
local cap = tonumber(ARGV[2])
for _ = 1, 1000 do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #head == 0 then break end
  local rec = ARGV[3] .. head[1]
  local status = redis.call('HGET', rec, 'status')
  if (not status) or not string.find(ARGV[6], ',' .. status .. ',', 1, true) then
    redis.call('ZREM', KEYS[2], head[1])
  else
    local total = tonumber(redis.call('HGET', rec, 'total') or '0') or 0
    local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
    if used + total > cap then break end
    redis.call('HINCRBY', KEYS[1], ARGV[1], total)
    redis.call('HSET', rec, 'admitted', total)
    redis.call('ZREM', KEYS[2], head[1])
    out[#out + 1] = head[1]
  end
end
return out
"""

# Claim an Idempotency-Key, or read what it holds.
# KEYS[1] the key's hash. ARGV: fingerprint, pending ttl ms.
# Returns {'claimed'} when this request does the work, else {state, fingerprint, status, body}.
CLAIM_IDEMPOTENCY = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'fp', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed'}
end
local f = redis.call('HMGET', KEYS[1], 'state', 'fp', 'status', 'body')
return {f[1] or '', f[2] or '', f[3] or '', f[4] or ''}
"""

# Keep a claimed key's final answer (also when the claim lapsed meanwhile, unless another request holds the key).
# KEYS[1] the key's hash. ARGV: fingerprint, status, body, ttl ms.
FINISH_IDEMPOTENCY = """
local fp = redis.call('HGET', KEYS[1], 'fp')
if fp and fp ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'fp', ARGV[1], 'status', ARGV[2], 'body', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# Keep a pending claim alive while its request works. KEYS[1] the key's hash. ARGV: fingerprint, ttl ms.
RENEW_IDEMPOTENCY = """
if redis.call('HGET', KEYS[1], 'state') == 'pending' and redis.call('HGET', KEYS[1], 'fp') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Give up a pending claim (the work failed with a 5xx: not kept, a retry does it again). KEYS[1], ARGV: fingerprint.
RELEASE_IDEMPOTENCY = """
if redis.call('HGET', KEYS[1], 'state') == 'pending' and redis.call('HGET', KEYS[1], 'fp') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# ---- a provider's adaptive in-flight limit (workers/ratelimit.py AdaptiveLimit, shared/store_ratelimit.py) ------
# State hash fields: limit (float), acks (successes toward the next +1), cut_at (ms of the last decrease),
# cut_level (the limit just before it; 0 = no congestion seen yet), ewma_ms and base_ms (smoothed latency and its
# running minimum), samples, cuts (decreases so far). The in-flight holders are the zset of `max_inflight`, scored
# by lease expiry, so a killed worker's slots lapse with their lease. The pause key holds µs (see PAUSE).

# KEYS: 1 holders zset, 2 state hash, 3 pause-until. ARGV: 1 holder, 2 lease ms, 3 floor, 4 ceiling.
# Returns {1, 0} when the holder got a slot, {0, 0} when every slot is taken, {0, ms} while the provider is paused.
ADAPTIVE_ACQUIRE = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local pause = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
if pause > now_us then return {0, math.ceil((pause - now_us) / 1000)} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local floor, ceiling = tonumber(ARGV[3]), tonumber(ARGV[4])
local limit = tonumber(redis.call('HGET', KEYS[2], 'limit') or '') or floor
limit = math.max(floor, math.min(ceiling, limit))
if redis.call('ZCARD', KEYS[1]) < math.floor(limit) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return {1, 0}
end
return {0, 0}
"""

# The AIMD step, on one request's outcome. KEYS: 1 holders zset, 2 state hash, 3 pause-until.
# ARGV: 1 holder ("" for none), 2 lease ms, 3 floor, 4 ceiling, 5 signal (1 success, 2 congestion: a 429 or 503,
# 0 anything else: no change), 6 latency ms of a success (-1 unknown), 7 Retry-After ms (0 none), 8 cool-down ms,
# 9 probe factor, 10 latency factor, 11 state ttl ms.
# - A success counts toward +1: one success per +1 until the first congestion (the limit doubles every round trip,
#   TCP's slow start); then `limit` successes per +1 (one round trip), twice as fast below the level of the last
#   decrease, and `probe factor` times slower within 2 of that level, where congestion was met last time.
# - Congestion halves the limit (not below the floor), at most once per cool-down, and only for a request sent
#   after the last decrease: the rest of a burst of 429s answers requests sent under the old limit.
# - Latency: an EWMA of successes' latency (alpha 1/20) against its running minimum (which drifts up slowly, so a
#   lasting change of the upstream is learned); an EWMA over `latency factor` x that minimum is congestion.
# - A congestion answer with Retry-After pauses the provider until it passes (never shortens a pause).
# Returns {limit (string), change: 1 up, -1 down, 0 none}.
ADAPTIVE_RELEASE = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local lease = tonumber(ARGV[2])
local sent_at = 0
if ARGV[1] ~= '' then
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if score then sent_at = tonumber(score) - lease end
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local floor, ceiling = tonumber(ARGV[3]), tonumber(ARGV[4])
local signal, latency = tonumber(ARGV[5]), tonumber(ARGV[6])
local retry_after, cooldown = tonumber(ARGV[7]), tonumber(ARGV[8])
local probe, lat_factor = tonumber(ARGV[9]), tonumber(ARGV[10])
if signal == 2 and retry_after > 0 then
  local until_us = now_us + retry_after * 1000
  if until_us > (tonumber(redis.call('GET', KEYS[3]) or '0') or 0) then
    redis.call('SET', KEYS[3], until_us, 'PX', retry_after + 1000)
  end
end
if signal == 0 then return {redis.call('HGET', KEYS[2], 'limit') or tostring(floor), 0} end
local f = redis.call('HMGET', KEYS[2], 'limit', 'acks', 'cut_at', 'cut_level', 'ewma_ms', 'base_ms', 'samples', 'cuts')
local limit = tonumber(f[1] or '') or floor
limit = math.max(floor, math.min(ceiling, limit))
local acks = tonumber(f[2] or '') or 0
local cut_at = tonumber(f[3] or '') or 0
local cut_level = tonumber(f[4] or '') or 0
local ewma = tonumber(f[5] or '')
local base = tonumber(f[6] or '')
local samples = tonumber(f[7] or '') or 0
local cuts = tonumber(f[8] or '') or 0
local congested = signal == 2
if signal == 1 and latency >= 0 then
  samples = samples + 1
  if ewma == nil then ewma = latency else ewma = ewma + (latency - ewma) / 20 end
  if samples >= 20 then
    if base == nil or ewma < base then base = ewma else base = base + (ewma - base) / 500 end
    if ewma > lat_factor * base then congested = true end
  end
end
local change = 0
if congested then
  if sent_at > cut_at and now - cut_at >= cooldown then
    cut_level = limit
    limit = math.max(floor, limit / 2)
    cut_at = now
    acks = 0
    cuts = cuts + 1
    change = -1
  end
else
  acks = acks + 1
  local need = limit
  if cut_level == 0 then need = 1
  elseif limit < cut_level - 2 then need = limit / 2
  elseif limit < cut_level + 2 then need = limit * probe end
  if acks >= need then
    acks = 0
    if limit < ceiling then
      limit = math.min(ceiling, limit + 1)
      change = 1
    end
  end
end
local fields = {'limit', tostring(limit), 'acks', acks, 'cut_at', cut_at, 'cut_level', tostring(cut_level),
                'samples', samples, 'cuts', cuts, 'updated', now}
if ewma ~= nil then fields[#fields + 1] = 'ewma_ms'; fields[#fields + 1] = tostring(ewma) end
if base ~= nil then fields[#fields + 1] = 'base_ms'; fields[#fields + 1] = tostring(base) end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[11]))
return {tostring(limit), change}
"""

# KEYS: 1 batch hash. ARGV: the chain token expected ('' = any), the new token, when its step is due.
# Hands a forwarded batch's chain of forward steps on to the next step (or, with '', to a new chain the sweeper
# starts): only the step holding the current token may, so a duplicate or superseded step starts no second chain.
# Returns 1 if handed on, else 0.
FORWARD_CHAIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'forward_chain') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'forward_chain', ARGV[2], 'forward_due_at', ARGV[3])
return 1
"""
