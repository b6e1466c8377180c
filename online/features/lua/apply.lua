-- One chunk, pre-aggregated by RedisStore._payload, applied atomically. ARGV: prefix, half-life, dedupe TTL,
-- recent items kept, dedupe max keys, now, chain key, previous token, this token, payload JSON {k, c, r, a, u},
-- score epoch, items kept per top set, co-engaged items kept per item.
-- Numbers go to redis.call as Lua numbers: Redis writes them with 17 significant digits (exact).
local p, H, ttl, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local maxkeys, now, chain, prev, token = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
local E, topkeep, coKeep = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local LN2 = math.log(2)
-- 0. chunks are pipelined: this one applies only after the one sent before it did (else: resend it)
if prev ~= '' and redis.call('GET', chain) ~= prev then return {-2} end
local P = cjson.decode(ARGV[10])
local K = P.k
local SLICE = 1000  -- unpack() takes at most ~8000 values
-- 1. dedupe: one sorted set of keys scored by when they were first applied; expired ones go first. The chunk
-- was aggregated assuming every key is new: if one is not (a replay), say which and apply nothing
local dq = p .. 'dedupe'
redis.call('ZREMRANGEBYSCORE', dq, '-inf', '(' .. (now - ttl))
local old = {-1}
for s = 1, #K, SLICE do
  local part = {unpack(K, s, math.min(s + SLICE - 1, #K))}
  local got = redis.call('ZMSCORE', dq, unpack(part))
  for i = 1, #part do if got[i] then old[#old + 1] = s + i - 1 end end
end
-- dedupe keys of the earlier layout (a string key each, with a TTL) live on for one TTL after an upgrade
local legacy = tonumber(redis.call('GET', p .. 'dedupe:legacy_until') or '-1')
if legacy < 0 then
  legacy = (redis.call('EXISTS', p .. 'applied') == 1) and (now + ttl) or 0
  redis.call('SET', p .. 'dedupe:legacy_until', legacy)
end
if now < legacy then
  for i = 1, #K do if redis.call('EXISTS', p .. K[i]) == 1 then old[#old + 1] = i end end
end
if #old > 1 then return old end
for s = 1, #K, SLICE do
  local args = {}
  for i = s, math.min(s + SLICE - 1, #K) do args[#args + 1] = now; args[#args + 1] = K[i] end
  redis.call('ZADD', dq, unpack(args))
end
local function merge(v0, t0, v, t)  -- two decayed (value, time) pairs -> one
  if t >= t0 then return v0 * 2 ^ (-(t - t0) / H) + v, t end
  return v0 + v * 2 ^ (-(t0 - t) / H), t0
end
-- 2. records whose creator / topic only the item's earlier impressions know: read them before this chunk's
local U = P.u
for i = 1, #U do
  local u = U[i]
  if u[6] == '' or u[7] == '' then
    local m = redis.call('HMGET', p .. 'i:' .. u[1], 'c', 't')
    if not m[1] and not m[2] then m = redis.call('HMGET', p .. 'm:' .. u[1], 'c', 't') end  -- earlier layout
    if u[6] == '' then u[6] = m[1] or '' end
    if u[7] == '' then u[7] = m[2] or '' end
  end
end
-- 3. counters: per hash one HMGET and one HSET of the merged (total, decayed, time) triples; item hashes also
-- take the item's creator ('c') and topic ('t') as the chunk's impressions leave them, and their merged
-- values go to TOP: counter name -> {score, item, ...} for the `top:<name>` sorted sets (step 3b)
local NDT = {}  -- counter name -> its three field names, built once per script run
local TOP, GONE = {}, {}  -- counter name -> ZADD arguments / items whose value is not positive
local function merge_hash(key, row, first, mc, mt, item)
  local fields = {}
  for j = first, #row, 4 do
    local name = row[j]
    local f = NDT[name]
    if f == nil then f = {'n:' .. name, 'd:' .. name, 't:' .. name}; NDT[name] = f end
    fields[#fields + 1] = f[1]
    fields[#fields + 1] = f[2]
    fields[#fields + 1] = f[3]
  end
  local got = redis.call('HMGET', key, unpack(fields))
  local out, g = {}, 0
  for j = first, #row, 4 do
    local n, v, t = row[j + 1], row[j + 2], row[j + 3]
    local n0, v0, t0 = tonumber(got[g + 1]), tonumber(got[g + 2]), tonumber(got[g + 3])
    if v0 ~= nil then n = n0 + n; v, t = merge(v0, t0, v, t) end
    out[#out + 1] = fields[g + 1]; out[#out + 1] = n
    out[#out + 1] = fields[g + 2]; out[#out + 1] = v
    out[#out + 1] = fields[g + 3]; out[#out + 1] = t
    g = g + 3
    if item then
      if v > 0 then
        local z = TOP[row[j]]
        if z == nil then z = {}; TOP[row[j]] = z end
        z[#z + 1] = math.log(v) / LN2 + (t - E) / H; z[#z + 1] = item
      else
        local z = GONE[row[j]]
        if z == nil then z = {}; GONE[row[j]] = z end
        z[#z + 1] = item
      end
    end
  end
  if mc ~= '' then out[#out + 1] = 'c'; out[#out + 1] = mc end
  if mt ~= '' then out[#out + 1] = 't'; out[#out + 1] = mt end
  redis.call('HSET', key, unpack(out))
end
local C = P.c
for i = 1, #C do
  local row = C[i]
  merge_hash(p .. row[1], row, 4, row[2], row[3], string.sub(row[1], 1, 2) == 'i:' and string.sub(row[1], 3))
end
-- 3b. per item counter a sorted set of items by log2(value) + (time - E) / H: the order of the values decayed
-- to any common time, so it never needs rescoring; the best `topkeep` are kept (the trending source)
for name, z in pairs(TOP) do
  local tkey = p .. 'top:' .. name
  for s = 1, #z, 2 * SLICE do redis.call('ZADD', tkey, unpack(z, s, math.min(s + 2 * SLICE - 1, #z))) end
  redis.call('ZREMRANGEBYRANK', tkey, 0, -(topkeep + 1))
end
for name, z in pairs(GONE) do
  for s = 1, #z, SLICE do redis.call('ZREM', p .. 'top:' .. name, unpack(z, s, math.min(s + SLICE - 1, #z))) end
end
-- 3c. co-engagement, before step 4 moves the users' recent sets: each engagement (in record order) of an item
-- that is not among the user's newest `keep` engaged items adds 1 at its time to the pair of it and each of
-- them, in both `co:<item>` sorted sets (log scores, as base.co_add: the same operations, the same doubles)
local EV = P.e
if #EV > 0 then
  local function newer(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2]) end
  local WIN, PAIRS, NB = {}, {}, {}  -- user -> {{ts, item}, ...} newest first; [a, b, x, ...]; a -> {b, ...}
  local NBSEEN = {}
  local function pair(a, b, x)
    PAIRS[#PAIRS + 1] = a; PAIRS[#PAIRS + 1] = b; PAIRS[#PAIRS + 1] = x
    local seen = NBSEEN[a]
    if seen == nil then seen = {}; NBSEEN[a] = seen; NB[a] = {} end
    if not seen[b] then seen[b] = true; NB[a][#NB[a] + 1] = b end
  end
  for k = 1, #EV, 3 do
    local user, ts, j = EV[k], EV[k + 1], EV[k + 2]
    local w = WIN[user]
    if w == nil then
      local got = redis.call('ZREVRANGE', p .. 'ur:' .. user, 0, keep - 1, 'WITHSCORES')
      w = {}
      for g = 1, #got, 2 do w[#w + 1] = {tonumber(got[g + 1]), got[g]} end
      WIN[user] = w
    end
    local at = nil
    for g = 1, #w do if w[g][2] == j then at = g; break end end
    if at == nil then
      local x = (ts - E) / H
      for g = 1, #w do pair(w[g][2], j, x); pair(j, w[g][2], x) end
      w[#w + 1] = {ts, j}
    elseif ts > w[at][1] then
      w[at][1] = ts
    end
    table.sort(w, newer)
    while #w > keep do table.remove(w) end
  end
  local S = {}  -- a -> b -> log score, read once per pair
  for a, list in pairs(NB) do
    local cur = {}
    for s = 1, #list, SLICE do
      local part = {unpack(list, s, math.min(s + SLICE - 1, #list))}
      local got = redis.call('ZMSCORE', p .. 'co:' .. a, unpack(part))
      for i = 1, #part do if got[i] then cur[part[i]] = tonumber(got[i]) end end
    end
    S[a] = cur
  end
  for k = 1, #PAIRS, 3 do
    local cur, b, x = S[PAIRS[k]], PAIRS[k + 1], PAIRS[k + 2]
    local s = cur[b]
    if s == nil then cur[b] = x
    else
      local hi, lo = s, x
      if x > s then hi, lo = x, s end
      cur[b] = hi + math.log(1 + 2 ^ (lo - hi)) / LN2
    end
  end
  for a, list in pairs(NB) do
    local cur, key = S[a], p .. 'co:' .. a
    for s = 1, #list, SLICE do
      local args = {}
      for i = s, math.min(s + SLICE - 1, #list) do args[#args + 1] = cur[list[i]]; args[#args + 1] = list[i] end
      redis.call('ZADD', key, unpack(args))
    end
    redis.call('ZREMRANGEBYRANK', key, 0, -(coKeep + 1))
  end
end
-- 4. per user: engaged items (sorted set by time, the last `keep`) and topic affinities
local R = P.r
for i = 1, #R do
  local row, rkey = R[i], p .. 'ur:' .. R[i][1]
  local args = {}
  for j = 2, #row, 2 do args[#args + 1] = row[j]; args[#args + 1] = row[j + 1] end
  redis.call('ZADD', rkey, 'GT', unpack(args))
  redis.call('ZREMRANGEBYRANK', rkey, 0, -(keep + 1))
end
local DT = {}  -- topic -> its two field names
local function merge_affinity(akey, row)  -- row: [user, topic, value, time, topic, ...]
  local fields = {}
  for j = 2, #row, 3 do
    local f = DT[row[j]]
    if f == nil then f = {'d:' .. row[j], 't:' .. row[j]}; DT[row[j]] = f end
    fields[#fields + 1] = f[1]; fields[#fields + 1] = f[2]
  end
  local got = redis.call('HMGET', akey, unpack(fields))
  local out, g = {}, -2
  for j = 2, #row, 3 do
    g = g + 2
    local v, t = row[j + 1], row[j + 2]
    local v0, t0 = tonumber(got[g + 1]), tonumber(got[g + 2])
    if v0 ~= nil then v, t = merge(v0, t0, v, t) end
    out[#out + 1] = fields[g + 1]; out[#out + 1] = v
    out[#out + 1] = fields[g + 2]; out[#out + 1] = t
  end
  redis.call('HSET', akey, unpack(out))
end
local A = P.a
for i = 1, #A do merge_affinity(p .. 'ua:' .. A[i][1], A[i]) end
-- 5. the records of step 2: [item, user, type, ts, value|false, creator, topic, affinity weight|false]
for i = 1, #U do
  local u = U[i]
  local etype, ts, value, creator, topic, w = u[3], u[4], u[5], u[6], u[7], u[8]
  if creator ~= '' then
    local row = {'', etype, 1, 1, ts}
    if value ~= false then row[6] = etype .. '_sum'; row[7] = value; row[8] = value; row[9] = ts end
    merge_hash(p .. 'c:' .. creator, row, 2, '', '')
  end
  if w ~= false and topic ~= '' then merge_affinity(p .. 'ua:' .. u[2], {u[2], topic, w, ts}) end
end
-- 6. the hard bound on dedupe keys: forget the oldest beyond `maxkeys` (their TTL would, later)
local n = redis.call('ZCARD', dq)
if n > maxkeys then redis.call('ZREMRANGEBYRANK', dq, 0, n - maxkeys - 1) end
if #K > 0 then redis.call('INCRBY', p .. 'applied', #K) end
redis.call('SET', chain, token, 'EX', 600)
return #K
