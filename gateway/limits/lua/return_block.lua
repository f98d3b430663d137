-- KEYS: 1 requests log, 2 tokens log, 3 tokens per id, 4 tokens sum
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
return 1
