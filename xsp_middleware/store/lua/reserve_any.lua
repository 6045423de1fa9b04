-- Choose among candidates, on one server: the first candidate (in the order given) that passes
-- every check, or (weighted) one of those that pass, at random in proportion to its weight, is
-- reserved; choosing and reserving are one atomic step.
-- KEYS[1] user hash ('' when the request is anonymous: no caps apply), KEYS[1 + i] candidate
-- i's config hash (N = #KEYS - 1 candidates). Its other keys are built here from ARGV[12],
-- '<prefix>:c:{', and only for the one chosen (one server has no slot rule to break).
-- ARGV[1] '' (first) or, weighted, a random number in [0, 1)   ARGV[2] user caps across
-- campaigns   ARGV[3] their (UTC) calendar bounds   ARGV[4] pacing burst allowance (parts per
-- 10000)   ARGV[5] request cost in units ('' = each campaign's)   ARGV[6] now override ms
-- ('' = TIME)   ARGV[7] '1' to count an impression   ARGV[8] what a stored opt-out does
-- ARGV[9] how long (ms) the reservation stays pending ('': it stands at once)   ARGV[10] its id
-- ARGV[11] P, the number of distinct profiles   ARGV[12] the key prefix of campaigns.
-- Then P profiles of 13 (see xsp_profile: the settings' config but the caps, which differ most
-- between candidates; candidates that share the rest share one, so a call carries it once),
-- then, from b = 13 + 13 P, the candidates' ids, from b + N their caps (the settings'), and,
-- only when P > 1, from b + 2 N their profiles' numbers.
-- Reply: reserve.lua's twelve elements for the chosen candidate, then its index (0: none was
-- eligible) and what each evaluated candidate got, in order, one character each: '0' plus its
-- reason code (14: eligible, not drawn), plus 16 or 32 when its check exhausted its lifetime
-- or daily budget (one string: an array costs the reply an element per candidate).
-- The denials of candidates passed over are not counted here: the app counts them and
-- writes the counts every quarter of a second (count_denials.lua), one write per campaign,
-- not one per decision and candidate.
-- A candidate whose stored time zone differs from the one its bounds came in stops the call
-- before it writes anything but settlements and exhaustion: reason 9, its index, its zone.
local n, draw, user = #KEYS - 1, ARGV[1], KEYS[1]
if user == '' then user = nil end
local now = xsp_now_ms(ARGV[6])
local cost_arg, hold = ARGV[5], ARGV[9] ~= '' and tonumber(ARGV[9])
local np, tag = tonumber(ARGV[11]), ARGV[12]
local ids_at = 13 + 13 * np
local caps_at, numbers_at = ids_at + n, np > 1 and ids_at + 2 * n
local outcomes, eligible, total = {}, nil, 0  -- (eligible: weighted, made when first needed)
local pick, c, k, u, personal, leasing = 0, nil, nil, nil, 1, ''

-- One read of the user's hash for every candidate: the preferences, the log across campaigns
-- (only with user caps), then each candidate's log (from logs_at + 1; its pending entries are
-- read only where its log alone reaches no cap, and its config has the pending flag: see
-- xsp_user_judge).
local got, ui, logs_at = {}, -1, 2  -- (ui -1: no log across campaigns; got[-1], got[0] nil)
if user then
  if ARGV[2] == '' then
    got = redis.call('HMGET', user, '!o', '!b', unpack(ARGV, ids_at, caps_at - 1))
  else
    ui, logs_at = 3, 4
    got = redis.call('HMGET', user, '!o', '!b', '*', '~*', unpack(ARGV, ids_at, caps_at - 1))
  end
end

-- One EXISTS over every candidate's config: when none stores one (their config is the
-- settings'), no candidate needs its own HGETALL, and each profile's gates are judged once.
local stored = redis.call('EXISTS', unpack(KEYS, 2)) > 0

-- With no preferences stored (or an opt-out that changes nothing), a candidate whose own log
-- reaches its caps is capped whatever else the user's state holds: xsp_user_judge's first
-- denial, reached without its other checks.
local plain = user and not got[2] and (got[1] ~= '1' or ARGV[8] == 'ignore')

-- The text that a log of one impression (its time, in 13 digits: the common log) must exceed
-- for that impression to reach one of the caps `spec`, so that candidates are judged without
-- reading a number each (tonumber costs as much as the rest of their check): digits of equal
-- length compare as their numbers do, in every locale. A hand-edited log of as many
-- characters that is not a time may count as an impression here, which can only deny. false
-- when no single impression can reach a cap (every cap allows two or more).
local function once_after(spec, bounds)
  local caps, after = xsp_parse_caps(spec, now, bounds), false
  for j = 1, #caps, 3 do
    if caps[j] <= 1 then
      local since = caps[j] == 1 and caps[j + 1]
      if not since then return '0000000000000' end  -- any impression, ever
      if not after or since < after then after = since end
    end
  end
  return after and string.format('%d', after)
end

-- Each profile's record, made when a candidate of it is first met: where its 13 arguments
-- start, its bounds, and what its candidates share when they store no config: the gates'
-- verdict (0: not judged yet), the one-impression thresholds of their caps (once_after, by
-- spec), and its config (xsp_profile; false until a candidate gets past its caps).
local profiles = {}
local cost_n = cost_arg ~= '' and tonumber(cost_arg)
for i = 1, n do
  local cid, spec, profile = ARGV[ids_at + i - 1], ARGV[caps_at + i - 1], '1'
  if numbers_at then profile = ARGV[numbers_at + i - 1] end
  local prof = profiles[profile]
  if not prof then
    local at = 13 + 13 * (tonumber(profile) - 1)
    prof = {at = at, bounds = ARGV[at + 10], gate = 0, afters = false, config = false}
    profiles[profile] = prof
  end
  if spec == '' then spec = nil end
  local cfg_key, reason, at = KEYS[1 + i], nil, prof.at
  c = stored and xsp_config_of(cfg_key, at, spec)
  if c then
    local tz = c.tz or 'UTC'
    if tz ~= ARGV[at + 9] then
      return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, c.leasing, i, string.char(unpack(outcomes))}
    end
    if c.pending == '1' then xsp_pending().settle_any(cfg_key, tag .. cid .. '}:st', c, now) end
    reason, spec, leasing = xsp_campaign_gate(c, cost_n, cost_n, now), c.caps, c.leasing
  else
    -- The settings' config: its zone and gates are the same for every candidate of a profile.
    reason, leasing = prof.gate, ''
    if reason == 0 then
      local tz = ARGV[at + 5]
      if tz == '' then tz = 'UTC' end
      if tz ~= ARGV[at + 9] then
        return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, '', i, string.char(unpack(outcomes))}
      end
      local max_cost, start, stop = ARGV[at + 12], ARGV[at + 6], ARGV[at + 7]
      reason = xsp_gate(max_cost ~= '' and max_cost or nil, ARGV[at + 4],
        start ~= '' and start or nil, stop ~= '' and stop or nil, cost_n, cost_n, now) or false
      prof.gate = reason
    end
  end
  if not reason then
    local log = got[logs_at + i]
    if plain and log and spec then
      if c then
        if xsp_log_check(log, spec, now, prof.bounds, nil) == -1 then reason = 1 end
      else
        local afters = prof.afters
        if not afters then
          afters = {}
          prof.afters = afters
        end
        local after = afters[spec]
        if after == nil then
          after = once_after(spec, prof.bounds)
          afters[spec] = after
        end
        if after and #log == #after and log > after then reason = 1 end
      end
    end
    if reason then
      personal = 1
    else
      if not c then
        c = prof.config
        if not c then
          c = xsp_profile(at)
          prof.config = c
        end
      end
      reason, u = xsp_user_judge(user, cid, got, logs_at + i, c.pending == '1' and 0 or -1, ui,
        spec, prof.bounds, ARGV[2], ARGV[3], now, ARGV[8])
      personal = u.personal
    end
  end
  if not reason then
    local st_key = tag .. cid .. '}:st'
    k = xsp_campaign_start(st_key, c, cost_arg, now, prof.bounds)
    reason = xsp_campaign_budget(cfg_key, st_key, c, k, ARGV[4])
  end
  if reason then
    outcomes[i] = 48 + ((reason == 2 and k) and 2 + 16 * k.fired or reason)
  elseif draw == '' then
    pick = i
    break
  else
    local w = xsp_weight(c, ARGV[at + 11])
    eligible = eligible or {}
    eligible[#eligible + 1] = {i, c, k, u, w}
    total = total + w
    outcomes[i] = 62  -- '0' + 14
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
  return {0, 0, 0, 0, -1, now, 0, 0, 0, '', personal, leasing, 0, string.char(unpack(outcomes))}
end

outcomes[pick] = 48
if u.fresh then
  -- The hash is new only if none of the fields read held anything (its TTL is then set with
  -- NX; an older hash keeps its own alive with GT: see xsp_keep_alive).
  for j = 1, #got do
    if got[j] then
      u.fresh = false
      break
    end
  end
end
local cid, logs, rid = ARGV[ids_at + pick - 1], 0, ''
local cfg_key, st_key = KEYS[1 + pick], tag .. cid .. '}:st'
if not hold then
  xsp_campaign_commit(st_key, k, ARGV[7])
  logs = xsp_user_commit(u, cid, k.now)
else
  rid = ARGV[10]
  local pend, own = xsp_pending(), tag .. cid .. '}:'
  xsp_campaign_commit(st_key, k, '0')  -- the beacon counts the impression
  logs = pend.user_hold(u, cid, k.now, k.now + hold + XSP_HOLD_GRACE_MS, rid)
  pend.hold(cfg_key, st_key, own .. 'z', own .. 'pd', c, k, rid, hold, logs > 0 and user or '')
end
return {1, 0, k.cost, k.remaining - k.cost, u.left, k.now, 0, k.day_start, logs, rid,
  u.personal, c.leasing, pick, string.char(unpack(outcomes))}
