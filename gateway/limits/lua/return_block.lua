-- KEYS: 1 requests log, 2 tokens log, 3 tokens per id, 4 tokens sum,
--       5 expected cost per id in flight (nano-USD), 6 their expiry, 7 expected cost in flight
-- ARGV: 1 block id, 2 first unused request, 3 last request of the block, 4 unused tokens
local block = ARGV[1]
local first, last = tonumber(ARGV[2]), tonumber(ARGV[3])
if first <= last then
  local entries = {}
  for n = first, last do entries[#entries + 1] = block .. '#' .. n end
  redis.call('ZREM', KEYS[1], unpack(entries))
end
local unused = tonumber(ARGV[4])
if unused > 0 and redis.call('HEXISTS', KEYS[3], block) == 1 then
  redis.call('HINCRBY', KEYS[3], block, -unused)
  redis.call('DECRBY', KEYS[4], unused)
end
-- the unused places' expected cost (the used ones give theirs back when settled)
local each = redis.call('HGET', KEYS[5], block .. '#each')
if each and first <= last then
  local release = (last - first + 1) * tonumber(each)
  local left = redis.call('HINCRBY', KEYS[5], block, -release)
  redis.call('DECRBY', KEYS[7], release)
  if left <= 0 then
    redis.call('HDEL', KEYS[5], block, block .. '#each')
    redis.call('ZREM', KEYS[6], block)
  end
end
return 1
