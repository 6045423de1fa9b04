-- Choose among candidates, on one server: the first candidate (in the order given) that passes
-- every check, or (weighted) one of those that pass, at random in proportion to its weight, is
-- reserved; choosing and reserving are one atomic step.
-- KEYS[1] user hash ('' when the request is anonymous: no caps apply). The candidates' keys
-- are built here from ARGV[13], '<prefix>:c:{': two arguments fewer per candidate, and one
-- server has no slot rule to break.
-- ARGV[1] the number of candidates   ARGV[2] '' (first) or, weighted, a random number in
-- [0, 1)   ARGV[3] user caps across campaigns   ARGV[4] their (UTC) calendar bounds
-- ARGV[5] pacing burst allowance (parts per 10000)   ARGV[6] request cost in units ('' = each
-- campaign's)   ARGV[7] now override ms ('' = TIME)   ARGV[8] '1' to count an impression
-- ARGV[9] what a stored opt-out does   ARGV[10] how long (ms) the reservation stays pending
-- ('': it stands at once)   ARGV[11] its id   ARGV[12] P, the number of distinct profiles
-- ARGV[13] the key prefix of campaigns. Then P profiles of 13 (candidates with the same
-- settings share one, so a call carries each once; see xsp_profile), then two per candidate,
-- from b = 14 + 13 P + 2 (i - 1): its id, its profile's number.
-- Reply: reserve.lua's twelve elements for the chosen candidate, then its index (0: none was
-- eligible) and what each evaluated candidate got, in order, an array of integers: its
-- reason code, plus 100 or 200 when its check exhausted its lifetime or daily budget
-- (14: eligible, not drawn).
-- The denials of candidates passed over are not counted here: the app counts them and
-- writes the counts every quarter of a second (count_denials.lua), one write per campaign,
-- not one per decision and candidate.
-- A candidate whose stored time zone differs from the one its bounds came in stops the call
-- before it writes anything but settlements and exhaustion: reason 9, its index, its zone.
local n, draw, user = tonumber(ARGV[1]), ARGV[2], KEYS[1]
if user == '' then user = nil end
local now = xsp_now_ms(ARGV[7])
local cost_arg, hold = ARGV[6], ARGV[10] ~= '' and tonumber(ARGV[10])
local ids_at, tag = 14 + 13 * tonumber(ARGV[12]), ARGV[13]
local outcomes, eligible, total = {}, {}, 0
local pick, c, k, u, personal, leasing = 0, nil, nil, nil, 1, ''

-- One read of the user's hash for every candidate: the preferences, each candidate's log
-- (from 3; its pending entries are read only where its log alone reaches no cap, see
-- xsp_user_judge), then the log across campaigns (only with user caps).
local got, ui = {}, -1  -- (-1: no log across campaigns; got[-1] and got[0] are nil)
if user then
  local fields = {'!o', '!b'}
  for i = 1, n do fields[2 + i] = ARGV[ids_at + 2 * (i - 1)] end
  if ARGV[3] ~= '' then
    ui = 3 + n
    fields[ui], fields[ui + 1] = '*', '~*'
  end
  got = redis.call('HMGET', user, unpack(fields))
end

local profiles = {}
local cost_n = cost_arg ~= '' and tonumber(cost_arg)
for i = 1, n do
  local cid, profile = ARGV[ids_at + 2 * (i - 1)], ARGV[ids_at + 2 * i - 1]
  local prof = profiles[profile]
  if not prof then
    prof = xsp_profile(14 + 13 * (tonumber(profile) - 1))
    profiles[profile] = prof
  end
  local own = tag .. cid .. '}:'
  local cfg_key = own .. 'cfg'
  c = xsp_config_of(cfg_key, prof)
  leasing = c.leasing
  local tz = c.tz or 'UTC'
  if tz ~= prof.bounds_tz then
    return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, leasing, i, outcomes}
  end
  if c.pending == '1' then xsp_pending().settle_any(cfg_key, own .. 'st', c, now) end
  local bounds = prof.bounds
  local reason = xsp_campaign_gate(c, cost_n, cost_n, now)  -- (the cost counts only if given)
  if not reason then
    reason, u = xsp_user_judge(user, cid, got, 2 + i, 0, ui, c.caps, bounds, ARGV[3], ARGV[4],
      now, ARGV[9])
    personal = u.personal
  end
  if not reason then
    local st_key = own .. 'st'
    k = xsp_campaign_start(st_key, c, cost_arg, now, bounds)
    reason = xsp_campaign_budget(cfg_key, st_key, c, k, ARGV[5])
  end
  if reason then
    outcomes[i] = (reason == 2 and k) and 2 + 100 * k.fired or reason
  elseif draw == '' then
    pick = i
    break
  else
    local w = xsp_weight(c, prof.weight)
    eligible[#eligible + 1] = {i, c, k, u, w, cid}
    total = total + w
    outcomes[i] = 14
  end
  k = nil
end

if draw ~= '' and total > 0 then
  local target = math.floor(tonumber(draw) * total)
  for _, e in ipairs(eligible) do
    target = target - e[5]
    if target < 0 then
      pick, c, k, u = e[1], e[2], e[3], e[4]
      break
    end
  end
end
if pick == 0 then
  return {0, 0, 0, 0, -1, now, 0, 0, 0, '', personal, leasing, 0, outcomes}
end

outcomes[pick] = 0
local cid, logs, rid = ARGV[ids_at + 2 * (pick - 1)], 0, ''
local cfg_key, st_key = tag .. cid .. '}:cfg', tag .. cid .. '}:st'
if not hold then
  xsp_campaign_commit(st_key, k, ARGV[8])
  logs = xsp_user_commit(u, cid, k.now)
else
  rid = ARGV[11]
  local pend, own = xsp_pending(), tag .. cid .. '}:'
  xsp_campaign_commit(st_key, k, '0')  -- the beacon counts the impression
  logs = pend.user_hold(u, cid, k.now, k.now + hold + XSP_HOLD_GRACE_MS, rid)
  pend.hold(cfg_key, st_key, own .. 'z', own .. 'pd', c, k, rid, hold, logs > 0 and user or '')
end
return {1, 0, k.cost, k.remaining - k.cost, u.left, k.now, 0, k.day_start, logs, rid,
  u.personal, c.leasing, pick, outcomes}
