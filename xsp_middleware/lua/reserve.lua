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
--   time zone (reason 9 only, else ''), 1 if the user's state was used (0: not tracked)}.
-- Reasons: 0 served, 1 frequency_capped, 2 budget_exhausted, 3 campaign_paused, 4 paced,
--   5 campaign_inactive, 6 no_consent, 7 user_blocked,
--   9 retry: the config's time zone differs from ARGV[11].
local cid = ARGV[1]
local c = xsp_config(KEYS[1], 2)
local tz = c.tz or 'UTC'
if tz ~= ARGV[11] then return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1} end

local cost_s = ARGV[16]
if cost_s == '' then cost_s = c.cost or '0' end
local cost = tonumber(cost_s)
local budget = tonumber(c.budget) or 0
local now = xsp_now_ms(ARGV[17])
local spent = tonumber(redis.call('HGET', KEYS[2], 'spent') or '0')
local remaining = budget - spent

local personal = 1
local function deny(reason, left, fired, day)
  redis.call('HINCRBY', KEYS[2], 'n:' .. reason, 1)
  return {0, reason, cost, remaining, left or -1, now, fired or 0, day or 0, 0, '', personal}
end

if c.status == 'paused' then return deny(3) end
if (c.start and now < tonumber(c.start)) or (c['end'] and now >= tonumber(c['end'])) then
  return deny(5)
end

-- The user's stored preferences, in this same round trip: an opt-out, blocked campaigns.
local user = KEYS[3]
if user then
  local prefs = redis.call('HMGET', user, '!o', '!b')
  if prefs[2] and string.find(',' .. prefs[2] .. ',', ',' .. cid .. ',', 1, true) then
    return deny(7)  -- "stop seeing this ad" holds whatever else the user chose
  end
  if prefs[1] == '1' and ARGV[19] ~= 'ignore' then
    personal = 0
    if ARGV[19] == 'deny' then return deny(6) end
    user = nil  -- no_tracking: serve without reading or writing the user's state
  end
end

-- Caps: the campaign's (field = campaign id) and the user's across campaigns (field '*').
local left = -1
local camp_left, camp_life, camp_times, camp_caps
local user_left, user_life, user_times, user_caps
if user then
  camp_left, camp_life, camp_times, camp_caps =
    xsp_user_check(user, cid, c.caps, now, ARGV[12])
  if camp_left == -1 then return deny(1, 0) end
  user_left, user_life, user_times, user_caps =
    xsp_user_check(user, '*', ARGV[13], now, ARGV[14])
  if user_left == -1 then return deny(1, 0) end
  for _, l in ipairs({camp_left, user_left}) do
    if l ~= false and (left == -1 or l < left) then left = l end
  end
end

-- Budgets: lifetime, then the local day's.
local daily = tonumber(c.daily_budget)
local day_start, day_end, day_field, day_spent = 0, 0, nil, 0
if daily then
  day_start, day_end = xsp_period(xsp_bounds(ARGV[12]).day, now)
  day_field = 'day:' .. xsp_int(day_start)
  day_spent = tonumber(redis.call('HGET', KEYS[2], day_field) or '0')
  if daily - day_spent < remaining then remaining = daily - day_spent end
end
if c.status == 'exhausted' then return deny(2, left) end
if spent + cost > budget then
  -- Exhausted once what is left cannot pay for the campaign's own price. The hook fires once
  -- per exhaustion: a marker keeps the budget that ran out, so pausing and resuming never
  -- fires it again, while a raised budget that runs out again does.
  if budget - spent < (tonumber(c.cost) or 1) or budget - spent <= 0 then
    redis.call('HSET', KEYS[1], 'status', 'exhausted')
    local fired = 0
    if redis.call('HGET', KEYS[2], 'lx') ~= c.budget then
      redis.call('HSET', KEYS[2], 'lx', c.budget)
      fired = 1
    end
    return deny(2, left, fired)
  end
  return deny(2, left)
end
if daily and day_spent + cost > daily then
  local fired = 0
  if daily - day_spent < (tonumber(c.cost) or 1) or daily - day_spent <= 0 then
    if redis.call('HSETNX', KEYS[2], 'dx:' .. xsp_int(day_start), 1) == 1 then fired = 2 end
  end
  return deny(2, left, fired, day_start)
end

-- Pacing: spend in the period may not pass the ideal linear curve plus a burst allowance.
-- The ceiling is a threshold, not an amount: computing it in floating point is fine.
if c.pacing == 'even' or c.pacing == 'frontloaded' then
  local p_start, p_end, p_budget, p_spent
  if daily then
    p_start, p_end, p_budget, p_spent = day_start, day_end, daily, day_spent
  elseif c.start and c['end'] then
    p_start, p_end, p_budget, p_spent = tonumber(c.start), tonumber(c['end']), budget, spent
  end
  if p_start and p_end > p_start then
    local f = (now - p_start) / (p_end - p_start)
    local allowance = tonumber(ARGV[15]) / 10000
    if c.pacing == 'frontloaded' then allowance = 0.40 - (0.40 - allowance) * f end
    if p_spent + cost > p_budget * (f + allowance) then return deny(4, left) end
  end
end

if cost > 0 then redis.call('HINCRBY', KEYS[2], 'spent', cost_s) end
if ARGV[18] == '1' then redis.call('HINCRBY', KEYS[2], 'impressions', 1) end
if day_field then
  if cost > 0 then redis.call('HINCRBY', KEYS[2], day_field, cost_s) end
  -- Keep only today's and yesterday's day fields.
  redis.call('HDEL', KEYS[2], 'day:' .. xsp_int(day_start - 2 * 86400000))
end
local logs = 0
if user then
  local ttl = xsp_user_record(user, cid, camp_caps, camp_life, camp_times, now)
  local user_ttl = xsp_user_record(user, '*', user_caps, user_life, user_times, now)
  if #camp_caps > 0 then logs = logs + 1 end
  if #user_caps > 0 then logs = logs + 2 end
  if user_ttl > ttl then ttl = user_ttl end
  xsp_keep_alive(user, ttl)
end
return {1, 0, cost, remaining - cost, left, now, 0, day_start, logs, '', personal}
