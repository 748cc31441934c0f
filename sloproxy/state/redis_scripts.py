"""The Lua scripts behind :mod:`sloproxy.state.redis_state`.

Each runs atomically in Redis, so a sync reads every replica's record and writes its own in one
step: no other replica can slip a share in between. Time is Redis's own (``TIME``), so replicas'
clocks never have to agree. Numbers passed back to ``redis.call`` go through ``int()`` because Lua
numbers are doubles and Redis would otherwise print large ones in exponent form.
"""

from __future__ import annotations

import hashlib

_COMMON = """
local function int(x) return string.format('%d', x) end
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: 1 replicas (zset: id -> lease expiry ms), 2 records (hash: id -> JSON {backend: [share, prev,
#       in_flight, kv_tokens, demand, budget view]}), 3 queues (hash: id -> JSON [[model, class, n]]),
#       4 tenants (hash: tenant -> tokens), 5 tenant batch sequence numbers (hash: id -> seq), 6 epoch
# ARGV: 1 replica id, 2 lease ms, 3 message JSON {b: {backend: [in_flight, kv_tokens, demand, budget
#       view or -1, prev share]}, t: [[seq, {tenant: tokens}]], w: [tenants to read], leave: 1},
#       4 TTL of the fleet's records ms, 5 TTL of tenant totals and epoch ms, 6 own queue JSON or ""
SYNC = (
    _COMMON
    + """
local id = ARGV[1]
local lease = tonumber(ARGV[2])
local msg = cjson.decode(ARGV[3])
local ttl, long_ttl = ARGV[4], ARGV[5]
local now = server_ms()

-- 1. the dead: a replica whose lease ran out loses its records (its capacity returns)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now))
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
  redis.call('HDEL', KEYS[2], unpack(dead))
  redis.call('HDEL', KEYS[3], unpack(dead))
  redis.call('HDEL', KEYS[5], unpack(dead))
end

-- 2. tenant increments, exactly once: a batch is applied only if its number is new
if msg.t then
  local last = tonumber(redis.call('HGET', KEYS[5], id) or 0)
  for _, batch in ipairs(msg.t) do
    if batch[1] > last then
      for tenant, tokens in pairs(batch[2]) do redis.call('HINCRBY', KEYS[4], tenant, int(tokens)) end
      last = batch[1]
    end
  end
  redis.call('HSET', KEYS[5], id, int(last))
  redis.call('PEXPIRE', KEYS[4], long_ttl)
end

if msg.leave then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[5], id)
  return '{}'
end

-- 3. the epoch: missing means Redis lost its data; for one lease nobody's share may grow
local epoch = tonumber(redis.call('GET', KEYS[6]) or 0)
if epoch == 0 then
  epoch = now
  redis.call('SET', KEYS[6], int(now))
end
redis.call('PEXPIRE', KEYS[6], long_ttl)
local frozen = now < epoch + lease

local fresh = redis.call('ZSCORE', KEYS[1], id) == false
redis.call('ZADD', KEYS[1], int(now + lease), id)

local others = {}
local flat = redis.call('HGETALL', KEYS[2])
for k = 1, #flat, 2 do
  if flat[k] ~= id then others[#others + 1] = {flat[k], cjson.decode(flat[k + 1])} end
end

-- 4. the target: one slot each when there are enough, the rest in proportion to demand + 1,
--    largest remainder first (ties by replica id): the targets of one run sum to the budget exactly
local function target(budget, ids, demands)
  local n = #ids
  local base, rest = 0, budget
  if budget >= n then base, rest = 1, budget - n end
  local total = 0
  for k = 1, n do total = total + demands[k] + 1 end
  local used, floors, rems = 0, {}, {}
  for k = 1, n do
    local q = rest * (demands[k] + 1)
    floors[k] = math.floor(q / total)
    rems[k] = q - floors[k] * total
    used = used + floors[k]
  end
  local rank = 0
  for k = 2, n do
    if rems[k] > rems[1] or (rems[k] == rems[1] and ids[k] < ids[1]) then rank = rank + 1 end
  end
  if rank < rest - used then return base + floors[1] + 1 end
  return base + floors[1]
end

-- 5. the share: the target, but only out of capacity no other live replica holds
local shares, remote, record = {}, {}, {}
for name, mine in pairs(msg.b) do
  local in_flight, kv, demand, view, prev = mine[1], mine[2], mine[3], mine[4], mine[5]
  local budget, leader = view, id
  local held, r_in_flight, r_kv = 0, 0, 0
  local ids, demands = {id}, {demand}
  for _, other in ipairs(others) do
    local o = other[2][name]
    if o then
      if o[6] >= 0 and (budget < 0 or other[1] < leader) then budget, leader = o[6], other[1] end
      held = held + math.max(o[1], o[2], o[3])
      r_in_flight = r_in_flight + o[3]
      r_kv = r_kv + o[4]
      ids[#ids + 1] = other[1]
      demands[#demands + 1] = o[5]
    end
  end
  if budget < 0 then budget = 0 end
  local share = math.min(target(budget, ids, demands), math.max(0, budget - held))
  if frozen then share = math.min(share, prev) end
  shares[name] = share
  remote[name] = {r_in_flight, r_kv}
  record[name] = {share, prev, in_flight, kv, demand, view}
end
redis.call('HSET', KEYS[2], id, cjson.encode(record))

-- 6. queue depths: each replica writes its own; the others' are summed for the caller
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], id, ARGV[6]) end
local sums = {}
local qflat = redis.call('HGETALL', KEYS[3])
for k = 1, #qflat, 2 do
  if qflat[k] ~= id then
    for _, e in ipairs(cjson.decode(qflat[k + 1])) do
      local by_class = sums[e[1]] or {}
      sums[e[1]] = by_class
      by_class[e[2]] = (by_class[e[2]] or 0) + e[3]
    end
  end
end
local queues = {}
for model, by_class in pairs(sums) do
  for class, n in pairs(by_class) do queues[#queues + 1] = {model, class, n} end
end

local totals = {}
if msg.w and #msg.w > 0 then totals = redis.call('HMGET', KEYS[4], unpack(msg.w)) end

for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[5]}) do redis.call('PEXPIRE', key, ttl) end
return cjson.encode({s = shares, r = remote, q = queues, t = totals, n = redis.call('ZCARD', KEYS[1]),
                     f = frozen and 1 or 0, j = fresh and 1 or 0})
"""
)

# Sliding-window counter: this window's count plus the previous one's, weighted by how much of it
# still overlaps the sliding window. KEYS: 1 the limiter's hash (window index -> count).
# ARGV: 1 limit, 2 window ms, 3 cost. Returns {allowed 0/1, retry after ms}.
RATE = (
    _COMMON
    + """
local limit, window, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = server_ms()
local index = math.floor(now / window)
local elapsed = (now - index * window) / window
local current = tonumber(redis.call('HGET', KEYS[1], int(index)) or 0)
local previous = tonumber(redis.call('HGET', KEYS[1], int(index - 1)) or 0)
if previous * (1 - elapsed) + current + cost <= limit then
  redis.call('HINCRBY', KEYS[1], int(index), int(cost))
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    local i = tonumber(field)
    if i ~= index and i ~= index - 1 then redis.call('HDEL', KEYS[1], field) end
  end
  redis.call('PEXPIRE', KEYS[1], int(2 * window + 1000))
  return {1, 0}
end
local wait
if cost > limit then
  wait = window
elseif current + cost <= limit then
  -- later in this window, once the previous window weighs little enough
  wait = (1 - (limit - current - cost) / previous - elapsed) * window
else
  -- in the next window, once this one (then the previous) weighs little enough
  wait = (1 - elapsed) * window + (1 - (limit - cost) / current) * window
end
return {0, math.max(1, math.ceil(wait))}
"""
)

# A correction to a RATE limiter, applied whatever the limit (a tenant's tokens once the engine
# reported the true count; negative refunds). KEYS: 1 the limiter's hash. ARGV: 1 window ms, 2 cost.
CHARGE = (
    _COMMON
    + """
local window, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local index = math.floor(server_ms() / window)
redis.call('HINCRBY', KEYS[1], int(index), int(cost))
redis.call('PEXPIRE', KEYS[1], int(2 * window + 1000))
return 1
"""
)

# KEYS: 1 the role's key. ARGV: 1 replica id, 2 lease ms. Returns 1 if this replica leads.
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

# KEYS: 1 the role's key. ARGV: 1 replica id. Deletes the lease only if this replica holds it.
RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def sha1(script: str) -> str:
    """The digest EVALSHA names a script by (computed here: no SCRIPT LOAD round trip)."""
    return hashlib.sha1(script.encode()).hexdigest()
