-- Redis Cluster: the campaign's half of a reservation, on the campaign's shard. It runs
-- concurrently with reserve_user.lua on the user's shard; the app releases whichever half
-- passed when the other denies.
-- KEYS[1] campaign config hash, KEYS[2] campaign state hash.
-- ARGV[1..19] as reserve.lua (the user arguments are unused here), and ARGV[20] the campaign
-- caps the user's half was given; when they differ from the stored ones the app must retry
-- with these (reason 10), like a time zone change (reason 9). Absent for anonymous requests.
-- Reply: as reserve.lua's; the user's fields (remaining impressions, logs) are -1 and 0, and
-- element 10 holds the time zone (reason 9) or the caps (reason 10); element 12 the stored
-- leasing flag.
local c = xsp_config(KEYS[1], 2)
local tz = c.tz or 'UTC'
local leasing = c.leasing
if tz ~= ARGV[11] then return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, leasing} end
if ARGV[20] and (c.caps or '') ~= ARGV[20] then
  return {0, 10, 0, 0, -1, 0, 0, 0, 0, c.caps or '', 1, leasing}
end

local k, reason = xsp_campaign_start(KEYS[2], c, ARGV[16], ARGV[17], ARGV[12])
reason = reason or xsp_campaign_budget(KEYS[1], KEYS[2], c, k, ARGV[15])
if reason then return xsp_deny(KEYS[2], reason, k, -1, 1, leasing) end
xsp_campaign_commit(KEYS[2], k, ARGV[18])
return {1, 0, k.cost, k.remaining - k.cost, -1, k.now, 0, k.day_start, 0, '', 1, leasing}
