-- Choose among candidates, on one server: the first candidate (in the order given) that passes
-- every check, or (weighted) one of those that pass, at random in proportion to its weight, is
-- reserved; choosing and reserving are one atomic step.
-- KEYS[1] user hash ('' when the request is anonymous: no caps apply), then each candidate's
-- config hash and state hash (KEYS[2i], KEYS[2i + 1]). (Its pending keys sit next to them:
-- one server has no slot rule to break.)
-- ARGV[1] the number of candidates   ARGV[2] '' (first) or, weighted, a random integer in
-- [0, 2^28)   ARGV[3] user caps across campaigns   ARGV[4] their (UTC) calendar bounds
-- ARGV[5] pacing burst allowance (parts per 10000)   ARGV[6] request cost in units ('' = each
-- campaign's)   ARGV[7] now override ms ('' = TIME)   ARGV[8] '1' to count an impression
-- ARGV[9] what a stored opt-out does   ARGV[10] how long (ms) the reservation stays pending
-- ('': it stands at once)   ARGV[11] its id.
-- Then 14 per candidate, from at = 12 + 14 (i - 1): its id, its fallback config (9, see
-- xsp_config), the time zone the bounds were computed in, its calendar bounds, its fallback
-- weight, the settings' bid ceiling ('' none).
-- Reply: reserve.lua's twelve elements for the chosen candidate, then its index (0: none was
-- eligible) and what each evaluated candidate got, in order: its reason code, with '.1' or
-- '.2' when its check exhausted its lifetime or daily budget (14: eligible, not drawn).
-- A candidate whose stored time zone differs from the one its bounds came in stops the call
-- before it writes anything but settlements and exhaustion: reason 9, its index, its zone.
local n, draw, user = tonumber(ARGV[1]), ARGV[2], KEYS[1]
if user == '' then user = nil end
local now = xsp_now_ms(ARGV[7])
local cost_arg, hold = ARGV[6], ARGV[10] ~= '' and tonumber(ARGV[10])
local outcomes, denied, eligible, total = {}, {}, {}, 0
local pick, c, k, u, personal, leasing = 0, nil, nil, nil, 1, ''

for i = 1, n do
  local at, cfg_key, st_key = 12 + 14 * (i - 1), KEYS[2 * i], KEYS[2 * i + 1]
  c = xsp_config(cfg_key, at + 1, ARGV[at + 13])
  leasing = c.leasing
  local tz = c.tz or 'UTC'
  if tz ~= ARGV[at + 10] then
    return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, leasing, i, table.concat(outcomes, ',')}
  end
  if c.pending == '1' then xsp_pending().settle_any(cfg_key, st_key, c, now) end
  local cost_s = cost_arg ~= '' and cost_arg or (c.cost or '0')
  local bounds = ARGV[at + 11]
  local reason = xsp_campaign_gate(c, cost_arg ~= '', tonumber(cost_s), now)
  if not reason then
    reason, u = xsp_user_gate(user, ARGV[at], c.caps, bounds, ARGV[3], ARGV[4], now, ARGV[9])
    personal = u.personal
  end
  if not reason then
    k = xsp_campaign_start(st_key, c, cost_arg, now, bounds)
    reason = xsp_campaign_budget(cfg_key, st_key, c, k, ARGV[5])
  end
  if reason then
    local fired = (reason == 2 and k and k.fired > 0) and ('.' .. k.fired) or ''
    outcomes[i] = reason .. fired
    if reason ~= 12 then denied[#denied + 1] = st_key denied[#denied + 1] = reason end
  elseif draw == '' then
    pick = i
    break
  else
    local w = xsp_weight(c, ARGV[at + 12])
    eligible[#eligible + 1] = {i, c, k, u, w}
    total = total + w
    outcomes[i] = '14'
  end
  k = nil
end

if draw ~= '' and total > 0 then
  local target = math.floor(tonumber(draw) * total / 268435456)
  for _, e in ipairs(eligible) do
    target = target - e[5]
    if target < 0 then
      pick, c, k, u = e[1], e[2], e[3], e[4]
      break
    end
  end
end
for j = 1, #denied, 2 do redis.call('HINCRBY', denied[j], 'n:' .. denied[j + 1], 1) end
if pick == 0 then
  return {0, 0, 0, 0, -1, now, 0, 0, 0, '', personal, leasing, 0, table.concat(outcomes, ',')}
end

outcomes[pick] = '0'
local at, cfg_key, st_key = 12 + 14 * (pick - 1), KEYS[2 * pick], KEYS[2 * pick + 1]
local cid, logs, rid = ARGV[at], 0, ''
if not hold then
  xsp_campaign_commit(st_key, k, ARGV[8])
  logs = xsp_user_commit(u, cid, k.now)
else
  rid = ARGV[11]
  local pend, tag = xsp_pending(), string.sub(cfg_key, 1, -4)
  xsp_campaign_commit(st_key, k, '0')  -- the beacon counts the impression
  logs = pend.user_hold(u, cid, k.now, k.now + hold + XSP_HOLD_GRACE_MS, rid)
  pend.hold(cfg_key, st_key, tag .. 'z', tag .. 'pd', c, k, rid, hold, logs > 0 and user or '')
end
return {1, 0, k.cost, k.remaining - k.cost, u.left, k.now, 0, k.day_start, logs, rid,
  u.personal, c.leasing, pick, table.concat(outcomes, ',')}
