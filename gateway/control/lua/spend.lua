-- Spend added to one key's aggregates for one day and model (atomic: one script).
-- KEYS: 1 the key's spend for the day (a hash: "r:" requests, "p:" prompt tokens,
--       "c:" completion tokens, "$:" cost in 1e-10 USD, each followed by the model id),
--       2 the names of the keys that spent that day (a set; both share the day's hash tag)
-- ARGV: 1 model id, 2 requests, 3 prompt tokens, 4 completion tokens, 5 cost (integer, 1e-10 USD),
--       6 seconds to keep the day, 7 key name
redis.call('HINCRBY', KEYS[1], 'r:' .. ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'p:' .. ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'c:' .. ARGV[1], ARGV[4])
redis.call('HINCRBY', KEYS[1], '$:' .. ARGV[1], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('SADD', KEYS[2], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
