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
-- Reply: {reserved 1/0, reason, cost, remaining budget, remaining impressions (-1: no caps),
--   reservation time ms, exhaustion fired (0 none, 1 lifetime, 2 daily), day start ms (0: no
--   daily budget), logs written (1: the campaign's, 2: the user's across campaigns; a sum),
--   time zone (reason 9 only, else ''), 1 if the user's state was used (0: not tracked),
--   the stored leasing flag ('1', '0' or '': unset; processes learn it from here)}.
-- Reasons: 0 served, 1 frequency_capped, 2 budget_exhausted, 3 campaign_paused, 4 paced,
--   5 campaign_inactive, 6 no_consent, 7 user_blocked,
--   9 retry: the config's time zone differs from ARGV[11].
local cid = ARGV[1]
local c = xsp_config(KEYS[1], 2)
local tz = c.tz or 'UTC'
local leasing = c.leasing
if tz ~= ARGV[11] then return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, leasing} end

local k, reason = xsp_campaign_start(KEYS[2], c, ARGV[16], ARGV[17], ARGV[12])
if reason then return xsp_deny(KEYS[2], reason, k, -1, 1, leasing) end
local u
reason, u = xsp_user_gate(KEYS[3], cid, c.caps, ARGV[12], ARGV[13], ARGV[14], k.now, ARGV[19])
if reason then return xsp_deny(KEYS[2], reason, k, u.left, u.personal, leasing) end
reason = xsp_campaign_budget(KEYS[1], KEYS[2], c, k, ARGV[15])
if reason then return xsp_deny(KEYS[2], reason, k, u.left, u.personal, leasing) end

xsp_campaign_commit(KEYS[2], k, ARGV[18])
local logs = xsp_user_commit(u, cid, k.now)
return {1, 0, k.cost, k.remaining - k.cost, u.left, k.now, 0, k.day_start, logs, '', u.personal,
  leasing}
