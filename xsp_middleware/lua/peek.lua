-- Read-only: would one more impression pass the user's caps now? Writes nothing.
-- KEYS[1] campaign config hash, KEYS[2] user hash. ARGV[1] campaign id, ARGV[2] fallback caps
-- spec, ARGV[3] now override ('' = TIME).
-- Reply: {1 allowed / 0 capped, remaining impressions after one more (-1: no caps)}
local caps = xsp_parse_caps(redis.call('HGET', KEYS[1], 'caps') or ARGV[2])
local lifetime, times = xsp_read_log(redis.call('HGET', KEYS[2], ARGV[1]))
local left = xsp_check_caps(caps, lifetime, times, xsp_now_ms(ARGV[3]))
if left == -1 then return {0, 0} end
if left == false then return {1, -1} end
return {1, left}
