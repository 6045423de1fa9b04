-- Budget leasing for hot campaigns: one process takes a slice of the campaign's remaining
-- budget, spends it locally, and reports back. Leased units are added to the spend when they are
-- granted, so every other process (and every non-leased decision) sees them as spent: no
-- overspend, whatever the concurrency. Unspent units come back with ARGV[16] (expiry, shutdown).
-- KEYS[1] campaign config hash, KEYS[2] campaign state hash, KEYS[3] this lease's last answer
-- (one key per process and campaign, in the campaign's slot; it expires after a day).
-- ARGV[1] campaign id   ARGV[2..10] fallback config (see xsp_config)
-- ARGV[11] time zone the bounds were computed in   ARGV[12] campaign calendar bounds
-- ARGV[13] pacing burst allowance (parts per 10000)   ARGV[14] now override ms ('' = TIME)
-- ARGV[15] units wanted ('0': only report)   ARGV[16] unspent units given back
-- ARGV[17] the day start ms those units were charged to ('0': no daily budget)
-- ARGV[18] leased units spent since the last report (they leave the 'leased' gauge)
-- ARGV[19] counters to add, "field=n,field=n" (impressions served from the lease, denials)
-- ARGV[20] the smallest grant worth having (one impression at the price the app will charge)
-- ARGV[21] the largest share of what is left one grant may take, as a divisor (8: an eighth)
-- ARGV[22] the call's sequence number for this lease. A call whose number was already applied
-- (sent again after its reply was lost) applies nothing and gets the same answer: the app can
-- always send a call again, so a lost reply never loses a grant, a report or a return.
-- Reply: {granted 1/0, reason (0, or 2 budget_exhausted, 3 campaign_paused, 4 paced,
--   5 campaign_inactive, 9 retry: the stored time zone differs from ARGV[11], 11 leasing is
--   off in the store), units granted,
--   remaining budget after the grant, server time ms, day start ms of the grant (0: no daily
--   budget), ms until the grant must stop being used (the end of the day, flight or pacing
--   period), the stored time zone, the stored caps, "<stored price>|<stored bid ceiling>"
--   (each '' when unset), the stored leasing flag}.
--   When refused for budget (reason 2), the remaining budget is negative if the campaign is now
--   over its budget (lowered meanwhile): the app gives its lease back at once.
local c = xsp_config(KEYS[1], 2)
local tz = c.tz or 'UTC'
local now = xsp_now_ms(ARGV[14])
local leasing = c.leasing
local seq = tonumber(ARGV[22])

local function reply(granted, reason, units, left, day_start, valid_ms)
  local valid_until = 0
  if valid_ms > 0 then valid_until = now + valid_ms end
  redis.call('SET', KEYS[3], table.concat({xsp_int(seq), granted, reason, xsp_int(units),
    xsp_int(left), xsp_int(day_start), xsp_int(valid_until)}, '|'), 'PX', 86400000)
  return {granted, reason, units, left, now, day_start, valid_ms, tz, c.caps or '',
    (c.cost or '') .. '|' .. (c.max_cost or ''), leasing}
end

local last = redis.call('GET', KEYS[3])
if last then
  local p = xsp_split(last, '|')
  if tonumber(p[1]) >= seq then
    local valid_ms = 0
    if tonumber(p[7]) > 0 then valid_ms = math.max(0, tonumber(p[7]) - now) end
    return {tonumber(p[2]), tonumber(p[3]), tonumber(p[4]), tonumber(p[5]), now,
      tonumber(p[6]), valid_ms, tz, c.caps or '', (c.cost or '') .. '|' .. (c.max_cost or ''),
      leasing}
  end
end

-- 1. The report: what the lease served and gives back. It applies whatever else happens.
local back = tonumber(ARGV[16])
if back > 0 then xsp_give_back(KEYS[2], ARGV[16], ARGV[17]) end
-- Units used since the last report leave the gauge (negative: a reported ad was released and
-- its units went back into the lease).
local settled = back + tonumber(ARGV[18])
if settled ~= 0 then
  local out = tonumber(redis.call('HGET', KEYS[2], 'leased') or '0')
  if out >= settled then
    redis.call('HINCRBY', KEYS[2], 'leased', xsp_int(-settled))
  elseif out > 0 then
    redis.call('HDEL', KEYS[2], 'leased')  -- the state was reset meanwhile
  end
end
for field, n in string.gmatch(ARGV[19], '([%w:]+)=(-?%d+)') do
  redis.call('HINCRBY', KEYS[2], field, n)
end
if back > 0 then xsp_reactivate(KEYS[1], KEYS[2], tonumber(c.cost) or 1) end

local wanted = tonumber(ARGV[15])
if tz ~= ARGV[11] then return reply(0, 9, 0, 0, 0, 0) end
if wanted <= 0 then return reply(1, 0, 0, 0, 0, 0) end
if leasing == '0' then return reply(0, 11, 0, 0, 0, 0) end  -- turned off in the store

-- 2. The grant: the gates of a reservation, then as much as the budgets and pacing allow now.
local k, reason = xsp_campaign_start(KEYS[2], c, '0', ARGV[14])
k.now = now
if reason then return reply(0, reason, 0, k.remaining, 0, 0) end
if c.status == 'exhausted' then return reply(0, 2, 0, k.remaining, 0, 0) end
local valid_until = now + 86400000
if c['end'] then valid_until = math.min(valid_until, tonumber(c['end'])) end
local room = k.remaining
local daily = tonumber(c.daily_budget)
local day_start, day_end, day_spent = 0, 0, 0
if daily then
  day_start, day_end = xsp_span(ARGV[12], 1, now)
  day_spent = tonumber(redis.call('HGET', KEYS[2], 'day:' .. xsp_int(day_start)) or '0')
  room = math.min(room, daily - day_spent)
  valid_until = math.min(valid_until, day_end)
end
-- Pacing: no more than the ideal curve plus the burst allowance allows right now.
if c.pacing == 'even' or c.pacing == 'frontloaded' then
  local p_start, p_end, p_budget, p_spent
  if daily then
    p_start, p_end, p_budget, p_spent = day_start, day_end, daily, day_spent
  elseif c.start and c['end'] then
    p_start, p_end, p_budget, p_spent = tonumber(c.start), tonumber(c['end']), k.budget, k.spent
  end
  if p_start and p_end > p_start then
    local f = (now - p_start) / (p_end - p_start)
    local allowance = tonumber(ARGV[13]) / 10000
    if c.pacing == 'frontloaded' then allowance = 0.40 - (0.40 - allowance) * f end
    room = math.min(room, math.floor(p_budget * (f + allowance) - p_spent))
  end
end
local smallest = tonumber(ARGV[20])
if smallest < 1 then smallest = 1 end
if room < smallest then
  local why = 2
  if k.remaining >= smallest and (not daily or daily - day_spent >= smallest) then why = 4 end
  local left = k.remaining
  if daily and daily - day_spent < left then left = daily - day_spent end
  return reply(0, why, 0, left, day_start, 0)
end
-- Leases shrink as the budget nears its end: one grant takes at most a share of what is left
-- (but always one impression), so what sits unspent in other processes stays small.
local grant = math.min(wanted, room, math.max(smallest, math.floor(room / tonumber(ARGV[21]))))
-- Whole impressions at the asked price: a fraction would sit unspendable in the lease.
grant = math.floor(grant / smallest) * smallest
local grant_s = xsp_int(grant)
redis.call('HINCRBY', KEYS[2], 'spent', grant_s)
redis.call('HINCRBY', KEYS[2], 'leased', grant_s)
if daily then
  redis.call('HINCRBY', KEYS[2], 'day:' .. xsp_int(day_start), grant_s)
  redis.call('HDEL', KEYS[2], 'day:' .. xsp_int(day_start - 2 * 86400000))
end
return reply(1, 0, grant, k.remaining - grant, day_start, valid_until - now)
