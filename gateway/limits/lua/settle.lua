-- KEYS: 1 tokens log, 2 tokens per id, 3 tokens sum, 4 leases, 5 spend today, 6 spend this month,
--       7 expected cost per id in flight (nano-USD), 8 their expiry, 9 expected cost in flight, 10 last cost
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
-- the expected cost reserved at admission gives way to the real one
if ARGV[6] == '' then
  local reserved = redis.call('HGET', KEYS[7], ARGV[1])
  if reserved then
    redis.call('HDEL', KEYS[7], ARGV[1])
    redis.call('ZREM', KEYS[8], ARGV[1])
    redis.call('DECRBY', KEYS[9], reserved)
  end
else
  local each = redis.call('HGET', KEYS[7], ARGV[1] .. '#each')
  if each then
    local left = redis.call('HINCRBY', KEYS[7], ARGV[1], -tonumber(each))
    redis.call('DECRBY', KEYS[9], each)
    if left <= 0 then
      redis.call('HDEL', KEYS[7], ARGV[1], ARGV[1] .. '#each')
      redis.call('ZREM', KEYS[8], ARGV[1])
    end
  end
end
local cost = tonumber(ARGV[3])
if cost > 0 then
  redis.call('INCRBYFLOAT', KEYS[5], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[4])
  redis.call('INCRBYFLOAT', KEYS[6], ARGV[3])
  redis.call('EXPIRE', KEYS[6], ARGV[5])
  redis.call('SET', KEYS[10], ARGV[3], 'EX', ARGV[5])
end
return 1
