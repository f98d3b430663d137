-- KEYS: 1 tokens log, 2 tokens per id, 3 tokens sum, 4 leases, 5 spend today, 6 spend this month
-- ARGV: 1 request id (or block id), 2 real tokens, 3 cost usd, 4 day ttl s, 5 month ttl s,
--       6 tokens the request reserved from its block ("" = not from a block: the entry is its own)
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if entry then
  local delta
  if ARGV[6] == '' then
    delta = tonumber(ARGV[2]) - tonumber(entry)
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  else
    delta = tonumber(ARGV[2]) - tonumber(ARGV[6])
    redis.call('HINCRBY', KEYS[2], ARGV[1], delta)
  end
  redis.call('INCRBY', KEYS[3], delta)
end
redis.call('ZREM', KEYS[4], ARGV[1])
local cost = tonumber(ARGV[3])
if cost > 0 then
  redis.call('INCRBYFLOAT', KEYS[5], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[4])
  redis.call('INCRBYFLOAT', KEYS[6], ARGV[3])
  redis.call('EXPIRE', KEYS[6], ARGV[5])
end
return 1
