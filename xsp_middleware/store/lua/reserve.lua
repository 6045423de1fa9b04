-- Reserve one impression: check the campaign's status and flight, the user's caps, the budgets
-- and pacing, then write the impression and its spend, all in one atomic step.
-- KEYS[1] campaign config hash, KEYS[2] campaign state hash, KEYS[3] user hash (absent when
-- the request is anonymous: no caps apply).
-- ARGV[1] campaign id (the user hash field)   ARGV[2..10] fallback config (see xsp_config)
-- ARGV[11] time zone the bounds were computed in   ARGV[12] campaign calendar bounds
-- ARGV[13] user caps across campaigns          ARGV[14] their (UTC) calendar bounds
-- ARGV[15] pacing burst allowance, in parts per 10000 of the period budget
-- ARGV[16] request cost in units ('' = the campaign's)   ARGV[17] now override ms ('' = TIME)
-- ARGV[18] '1' to count an impression ('0': spend only)
-- ARGV[19] what a stored opt-out does: 'no_tracking', 'deny' or 'ignore'
-- (The first fifteen change only per campaign and day: the app packs them once.)
-- Extras, only when a campaign has a bid ceiling, a price is signed or impressions wait for
-- beacons (without them the call is as above). KEYS[3] is then the user hash or '', KEYS[4]
-- the campaign's pending set and KEYS[5] its pending details (see xsp_pending). ARGV[20] ''
-- (reserve_campaign.lua's caps), ARGV[21] the settings' bid ceiling ('' none), ARGV[22] the
-- price signature's nonce ('' none), ARGV[23] its expiry ms, ARGV[24] how long (ms) the
-- reservation stays pending ('' : it stands at once), ARGV[25] its id. (A call without extras
-- still settles a campaign that ever held pending reservations: settle_any.)
-- Reply: {reserved 1/0, reason, cost, remaining budget, remaining impressions (-1: no caps),
--   reservation time ms, exhaustion fired (0 none, 1 lifetime, 2 daily), day start ms (0: no
--   daily budget), logs written (1: the campaign's, 2: the user's across campaigns; a sum;
--   4 more when pending), time zone (reason 9), bid ceiling (reason 12) or the pending
--   reservation's id (else ''), 1 if the user's state was used (0: not tracked),
--   the stored leasing flag ('1', '0' or '': unset; processes learn it from here)}.
-- Reasons: 0 served, 1 frequency_capped, 2 budget_exhausted, 3 campaign_paused, 4 paced,
--   5 campaign_inactive, 6 no_consent, 7 user_blocked,
--   9 retry: the config's time zone differs from ARGV[11],
--   12 above_max_cpm, 13 signature_replayed (bad input: nothing is counted).
local cid = ARGV[1]
local extras = ARGV[21]
local c = xsp_config(KEYS[1], 2, extras)
local tz = c.tz or 'UTC'
local leasing = c.leasing
if tz ~= ARGV[11] then return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, leasing} end

local user = KEYS[3]
if extras and user == '' then user = nil end
local now, hold, pend, replayed = xsp_reserve_start(c, KEYS[1], KEYS[2], KEYS[4], KEYS[5], ARGV[17])
if replayed then return {0, 13, 0, 0, -1, now, 0, 0, 0, '', 1, leasing} end
local k, reason = xsp_campaign_start(KEYS[2], c, ARGV[16], now, ARGV[12])
if reason == 12 then return {0, 12, k.cost, 0, -1, k.now, 0, 0, 0, c.max_cost, 1, leasing} end
if reason then return xsp_deny(KEYS[2], reason, k, -1, 1, leasing) end
local u
reason, u = xsp_user_gate(user, cid, c.caps, ARGV[12], ARGV[13], ARGV[14], k.now, ARGV[19],
  c.pending == '1')
if reason then return xsp_deny(KEYS[2], reason, k, u.left, u.personal, leasing) end
reason = xsp_campaign_budget(KEYS[1], KEYS[2], c, k, ARGV[15])
if reason then return xsp_deny(KEYS[2], reason, k, u.left, u.personal, leasing) end

if not hold then
  xsp_campaign_commit(KEYS[2], k, ARGV[18])
  local logs = xsp_user_commit(u, cid, k.now)
  return {1, 0, k.cost, k.remaining - k.cost, u.left, k.now, 0, k.day_start, logs, '',
    u.personal, leasing}
end
xsp_campaign_commit(KEYS[2], k, '0')  -- the beacon counts the impression
local logs = pend.user_hold(u, cid, k.now, k.now + hold + XSP_HOLD_GRACE_MS, ARGV[25])
pend.hold(KEYS[1], KEYS[2], KEYS[4], KEYS[5], c, k, ARGV[25], hold, logs > 0 and user or '')
return {1, 0, k.cost, k.remaining - k.cost, u.left, k.now, 0, k.day_start, logs, ARGV[25],
  u.personal, leasing}
