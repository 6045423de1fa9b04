-- Redis Cluster: whether a candidate's campaign could pay for one more impression now (the
-- campaign's side of choosing among candidates, for the candidates not reserved at once; see
-- reserve_user_any.lua). It reserves nothing; what it writes is what any check of the
-- campaign writes: expired pending reservations settled, an exhaustion it finds.
-- KEYS[1] campaign config hash, KEYS[2] state hash, KEYS[3] pending set, KEYS[4] pending
-- details. ARGV[1..19] as reserve.lua (the user's are unused), ARGV[20] the settings' bid
-- ceiling ('' none), ARGV[21] the campaign's fallback weight.
-- Reply: {reason (0: it could pay; 9: the stored time zone differs from ARGV[11]), exhaustion
--   fired (0, 1 lifetime, 2 daily), the stored time zone, the stored caps, the weight, the
--   stored leasing flag, the budget left (units: the lifetime's or the day's, the smaller),
--   the price (units)}.
local c = xsp_config(KEYS[1], 2, ARGV[20])
local tz = c.tz or 'UTC'
local weight = xsp_weight(c, ARGV[21])
if tz ~= ARGV[11] then return {9, 0, tz, c.caps or '', weight, c.leasing, 0, 0} end
local now = xsp_now_ms(ARGV[17])
if c.pending == '1' then xsp_pending().settle(KEYS[1], KEYS[2], KEYS[3], KEYS[4], c, now) end
local k, reason = xsp_campaign_start(KEYS[2], c, ARGV[16], now, ARGV[12])
if not reason then reason = xsp_campaign_budget(KEYS[1], KEYS[2], c, k, ARGV[15]) end
return {reason or 0, k.fired, tz, c.caps or '', weight, c.leasing, k.remaining, k.cost}
