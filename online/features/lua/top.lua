-- KEYS: the counter's top set. ARGV: prefix, counter name, n. The best n items and the (decayed value, time)
-- pairs of their hashes, as stored: [item, value, time, item, ...].
local p, name, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = redis.call('ZREVRANGE', KEYS[1], 0, n - 1)
local out = {}
for i = 1, #ids do
  local got = redis.call('HMGET', p .. 'i:' .. ids[i], 'd:' .. name, 't:' .. name)
  if got[1] and got[2] then out[#out + 1] = ids[i]; out[#out + 1] = got[1]; out[#out + 1] = got[2] end
end
return out
