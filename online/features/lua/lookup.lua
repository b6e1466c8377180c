-- KEYS: recent set, affinity hash, then item / creator hashes. ARGV: keep, now, half-life, counter names.
local keep, now, H = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local fields = {}
for j = 4, #ARGV do
  local name = ARGV[j]
  fields[#fields + 1] = 'n:' .. name
  fields[#fields + 1] = 'd:' .. name
  fields[#fields + 1] = 't:' .. name
end
local function decayed(v, t)
  if now > t then return v * 2 ^ (-(now - t) / H) end
  return v
end
local aff = {}
local h = redis.call('HGETALL', KEYS[2])
local byname = {}
for i = 1, #h, 2 do byname[h[i]] = h[i + 1] end
for k, v in pairs(byname) do
  if string.sub(k, 1, 2) == 'd:' then
    local t = byname['t:' .. string.sub(k, 3)]
    if t then aff[#aff + 1] = string.sub(k, 3); aff[#aff + 1] = decayed(tonumber(v), tonumber(t)) end
  end
end
local flat = {}
for i = 3, #KEYS do
  local vals = redis.call('HMGET', KEYS[i], unpack(fields))
  for j = 1, #fields, 3 do
    local n, d, t = tonumber(vals[j]), tonumber(vals[j + 1]), tonumber(vals[j + 2])
    flat[#flat + 1] = n or 0
    if d and t then flat[#flat + 1] = decayed(d, t) else flat[#flat + 1] = 0 end
  end
end
return cjson.encode({redis.call('ZREVRANGE', KEYS[1], 0, keep - 1), aff, flat})
