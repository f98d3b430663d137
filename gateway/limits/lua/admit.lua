-- KEYS: 1 requests log (zset id->ts), 2 tokens log (zset id->ts), 3 tokens per id (hash),
--       4 tokens sum (string), 5 leases (zset id->expiry), 6 spend today, 7 spend this month,
--       8 expected cost per id in flight (hash, nano-USD), 9 their expiry (zset id->ms),
--       10 expected cost in flight (string, nano-USD), 11 the key's last cost per request (USD)
-- ARGV: 1 window_ms, 2 rpm, 3 tpm, 4 max_concurrent, 5 tokens, 6 request id ("" = a block alone), 7 lease ttl ms,
--       8 budget day, 9 budget month   (0 or "" = no limit),
--       10 block id, 11 block requests wanted (0 = none), 12 cost per request, 13 block life ms
-- A block's requests are entries "<block id>#<n>", and its tokens one entry
-- "<block id>"; both are stamped at the end of the block's life, the latest
-- moment one of them can be used, so none leaves the window early.
-- Under a budget each admitted request (and each place of a block) reserves
-- the key's last cost per request until it is settled: the spend plus those
-- reservations is what a budget is checked against, so requests in flight,
-- on any worker, count before their cost is known.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rpm, tpm, maxc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, id, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local bday, bmonth = tonumber(ARGV[8]), tonumber(ARGV[9])
local since = now - window

local function oldest_reset(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) + window - now end
  return 0
end

-- requests
local rcount, rreset = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', since)
  rcount = redis.call('ZCARD', KEYS[1])
  rreset = oldest_reset(KEYS[1])
  if rcount >= rpm then return {'requests', rreset, 0, rreset, 0, 0} end
end
-- tokens: drop expired entries and their share of the sum
local tsum, treset = 0, 0
if tpm > 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', since)
  if #old > 0 then
    local drop = 0
    for _, m in ipairs(old) do drop = drop + tonumber(redis.call('HGET', KEYS[3], m) or '0') end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', since)
    for _, m in ipairs(old) do redis.call('HDEL', KEYS[3], m) end
    redis.call('DECRBY', KEYS[4], drop)
  end
  tsum = tonumber(redis.call('GET', KEYS[4]) or '0')
  if tsum < 0 then tsum = 0 end
  treset = oldest_reset(KEYS[2])
  if tsum + tokens > tpm then
    local wait = treset
    if tsum == 0 then wait = window end
    return {'tokens', wait, math.max(rpm - rcount, 0), rreset, math.max(tpm - tsum, 0), treset}
  end
end
local sday = redis.call('GET', KEYS[6]) or '0'
local smonth = redis.call('GET', KEYS[7]) or '0'
-- expected cost in flight: reservations whose holder never settled expire with the lease ttl
local budgets = bday > 0 or bmonth > 0
local pend, est = 0, 0
if budgets then
  local gone = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now)
  if #gone > 0 then
    local drop = 0
    for _, m in ipairs(gone) do drop = drop + tonumber(redis.call('HGET', KEYS[8], m) or '0') end
    redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
    for _, m in ipairs(gone) do redis.call('HDEL', KEYS[8], m, m .. '#each') end
    redis.call('DECRBY', KEYS[10], drop)
  end
  pend = tonumber(redis.call('GET', KEYS[10]) or '0')
  if pend < 0 then pend = 0 end
  pend = pend / 1e9
  est = tonumber(redis.call('GET', KEYS[11]) or '0')
end
-- concurrency
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= maxc then
    return {'concurrency', 1000, math.max(rpm - rcount, 0), rreset, math.max(tpm - tsum, 0), treset}
  end
end
-- budgets
if bday > 0 and tonumber(sday) + pend >= bday then
  return {'budget_day', 0, 0, 0, 0, 0}
end
if bmonth > 0 and tonumber(smonth) + pend >= bmonth then
  return {'budget_month', 0, 0, 0, 0, 0}
end
-- admitted: commit everything (an empty id asks for a block alone, with room for one request)
if rpm > 0 and id ~= '' then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window)
  if rcount == 0 then rreset = window end
  rcount = rcount + 1
end
if tpm > 0 and id ~= '' then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('HSET', KEYS[3], id, tokens)
  redis.call('INCRBY', KEYS[4], tokens)
  for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], window * 2) end
  if treset == 0 then treset = window end
  tsum = tsum + tokens
end
if maxc > 0 and id ~= '' then
  redis.call('ZADD', KEYS[5], now + ttl, id)
  redis.call('PEXPIRE', KEYS[5], ttl * 2)
end
local function reserve(member, nano, until_ms)
  redis.call('HINCRBY', KEYS[8], member, nano)
  redis.call('ZADD', KEYS[9], until_ms, member)
  redis.call('INCRBY', KEYS[10], nano)
  for i = 8, 10 do redis.call('PEXPIRE', KEYS[i], ttl * 2) end
end
local each = math.floor(est * 1e9 + 0.5)
if budgets and each > 0 and id ~= '' then
  reserve(id, each, now + ttl)
  pend = pend + each / 1e9
end
-- a block: never with a concurrency cap, and small beside what is left of
-- each limit, so that near a limit every request is counted one by one
local k, block, cost, life = tonumber(ARGV[11]), ARGV[10], tonumber(ARGV[12]), tonumber(ARGV[13])
if est > cost then cost = est end
if maxc > 0 then k = 0 end
if k > 0 and rpm > 0 then k = math.min(k, math.floor((rpm - rcount) / 16)) end
if k > 0 and tpm > 0 then k = math.min(k, math.floor((tpm - tsum) / (16 * math.max(tokens, 1)))) end
for _, b in ipairs({{bday, sday}, {bmonth, smonth}}) do
  if k > 0 and b[1] > 0 then
    if cost <= 0 then k = 0 else k = math.min(k, math.floor((b[1] - tonumber(b[2]) - pend) / (4 * cost))) end
  end
end
if k > 0 then
  local at = now + life
  if rpm > 0 then
    local entries = {}
    for n = 1, k do entries[2 * n - 1] = at; entries[2 * n] = block .. '#' .. n end
    redis.call('ZADD', KEYS[1], unpack(entries))
    redis.call('PEXPIRE', KEYS[1], window * 2)
    rcount = rcount + k
  end
  if tpm > 0 then
    redis.call('ZADD', KEYS[2], at, block)
    redis.call('HSET', KEYS[3], block, k * tokens)
    redis.call('INCRBY', KEYS[4], k * tokens)
    for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], window * 2) end
    tsum = tsum + k * tokens
  end
  if budgets then
    -- each place reserves the cost of one request, handed back as places are settled or returned
    each = math.floor(cost * 1e9 + 0.5)
    redis.call('HSET', KEYS[8], block .. '#each', each)
    reserve(block, k * each, at + ttl)
  else
    each = 0
  end
else
  k = 0
  each = 0
end
return {'', 0, math.max(rpm - rcount, 0), rreset, math.max(tpm - tsum, 0), treset, k, sday, smonth, each}
