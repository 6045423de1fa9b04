-- A pending reservation (record_on=beacon) on its campaign's side: confirm it (its beacon
-- came) or release it (its response failed, or the other half of a cluster decision denied).
-- KEYS[1] campaign config hash, KEYS[2] state hash, KEYS[3] pending set, KEYS[4] pending
-- details (see xsp_pending). ARGV[1] 'confirm' or 'release', ARGV[2] the reservation's id,
-- ARGV[3] now override ms ('' = TIME), ARGV[4] the campaign's price in the settings (units;
-- the stored one wins), ARGV[5] (release, optional) the counter to add one to instead of
-- 'n:released' ('' none).
-- Reply: {outcome, now ms, user key ('' none)}. Outcome 1: confirmed (counted once), or
-- released; 0: not pending (confirmed before, settled, or never known); 2: it had expired
-- (its spend goes back now, if no reserve call settled it yet).
local now = xsp_now_ms(ARGV[3])
local member = 'p' .. ARGV[2]
local due = redis.call('ZSCORE', KEYS[3], member)
if not due then return {0, now, ''} end
local d = redis.call('HGET', KEYS[4], ARGV[2])
local user = string.match(d or '', '^%d+|%d+|(.*)$') or ''
redis.call('ZREM', KEYS[3], member)
redis.call('HDEL', KEYS[4], ARGV[2])
if ARGV[1] == 'release' or tonumber(due) <= now then
  local cost = redis.call('HGET', KEYS[1], 'cost')
  xsp_pending().unhold(KEYS[1], KEYS[2], d, tonumber(cost or ARGV[4]) or 1)
  if ARGV[1] == 'release' then
    redis.call('HINCRBY', KEYS[2], 'b:served', -1)  -- it never was
    local counter = ARGV[5] or 'n:released'
    if counter ~= '' then redis.call('HINCRBY', KEYS[2], counter, 1) end
    return {1, now, user}
  end
  redis.call('HINCRBY', KEYS[2], 'b:expired', 1)
  return {2, now, user}
end
redis.call('HINCRBY', KEYS[2], 'impressions', 1)
redis.call('HINCRBY', KEYS[2], 'b:confirmed', 1)
local cost = string.match(d or '', '^(%d+)|')
if cost and cost ~= '0' then redis.call('HINCRBY', KEYS[2], 'b:held', '-' .. cost) end
return {1, now, user}
