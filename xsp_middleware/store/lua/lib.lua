-- Shared pieces of every xsp script; each script is the pieces its body uses, then the body.
-- Rules that keep the scripts exact on Redis and on the embedded store (fakeredis + lupa):
--   * money enters as decimal integer strings (ARGV or HGET) and goes to HINCRBY as such;
--     comparisons use tonumber(), exact because amounts stay below 2^53;
--   * money leaves as integer array elements, never through cjson or tostring();
--   * no struct/bit/cmsgpack, no shebang flags: fakeredis runs plain Lua 5.1.
-- Each script gets only the pieces its body uses (scripts.py follows the names), so a call
-- does not pay for building closures it never runs.
-- The cost per call is mostly the arguments, the reply and the redis.call()s (3-7k server
-- instructions each; a tonumber() or string.format() about 2k): the serve path reads each
-- hash once, and writes numbers with HINCRBY from the strings they came in as.

-- Times are milliseconds on the Redis server's clock, so skewed app servers agree.
local function xsp_now_ms(override)
  if override ~= nil and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function xsp_int(n)
  return string.format('%d', n)
end

-- Split on a one-character separator, keeping empty fields.
local function xsp_split(text, sep)
  local out, from = {}, 1
  while true do
    local at = string.find(text, sep, from, true)
    if not at then
      out[#out + 1] = string.sub(text, from)
      return out
    end
    out[#out + 1] = string.sub(text, from, at - 1)
    from = at + 1
  end
end

-- The stored hash fields (`stored`, as HGETALL answers) over the fallback config `c` (see
-- xsp_config).
local function xsp_overlay(c, stored)
  for i = 1, #stored, 2 do
    local name, v = stored[i], stored[i + 1]
    if c[name] == nil then  -- not a config field
    elseif v == '' or not (name == 'budget' or name == 'daily_budget' or name == 'cost'
        or name == 'start' or name == 'end' or name == 'max_cost' or name == 'weight')
        or string.find(v, '^%d+$') then
      c[name] = v
    end
  end
  -- '' means unset.
  if c.budget == '' then c.budget = nil end
  if c.daily_budget == '' then c.daily_budget = nil end
  if c.cost == '' then c.cost = nil end
  if c.caps == '' then c.caps = nil end
  if c.status == '' then c.status = nil end
  if c.tz == '' then c.tz = nil end
  if c.start == '' then c.start = nil end
  if c['end'] == '' then c['end'] = nil end
  if c.pacing == '' then c.pacing = nil end
  if c.max_cost == '' then c.max_cost = nil end
  return c
end

-- The settings' fallback config: nine ARGV from `at` (see xsp_config), '' meaning unset.
local function xsp_fallback(at, max_fallback)
  return {budget = ARGV[at], daily_budget = ARGV[at + 1], cost = ARGV[at + 2],
    caps = ARGV[at + 3], status = ARGV[at + 4], tz = ARGV[at + 5], start = ARGV[at + 6],
    ['end'] = ARGV[at + 7], pacing = ARGV[at + 8], leasing = '', max_cost = max_fallback or '',
    pending = '', weight = ''}
end

-- A campaign's config: each field from its stored hash, else from the settings' fallback,
-- nine ARGV from `at`: budget, daily_budget, cost, caps, status, tz, start, end, pacing;
-- '' means unset.
-- The same read brings the stored leasing flag (c.leasing: '1', '0' or '' when unset), and
-- c.pending, '1' once the campaign ever held a pending reservation (see xsp_pending).
-- HGETALL: its cost grows with the fields stored (often none: the settings' config applies),
-- where HMGET's grows with the fields asked for (ten of them cost four times as much).
-- Stored amounts and times must be plain integers: anything else (a hand-edited hash) falls
-- back to the settings' value rather than failing, or worse, parsing as inf.
-- `max_cost` (the bid ceiling, a cost per impression) is stored only where it was set; the
-- settings' value, when there is one, comes as `max_fallback`.
local function xsp_config(key, at, max_fallback)
  return xsp_overlay(xsp_fallback(at, max_fallback), redis.call('HGETALL', key))
end

-- A candidate profile's config (reserve_any.lua): the settings' config of the candidates that
-- share it, the first nine of its 13 ARGV from `at` (see xsp_config; the caps are '': each
-- candidate brings its own) and the bid ceiling (at + 12), as xsp_config reads them for a
-- campaign that stores nothing. Built once per call, only for a candidate that gets past its
-- gates and caps, and shared by them all: only read.
local function xsp_profile(at)
  local a = ARGV
  local budget, daily, cost, status, tz = a[at], a[at + 1], a[at + 2], a[at + 4], a[at + 5]
  local start, stop, pacing, max_cost = a[at + 6], a[at + 7], a[at + 8], a[at + 12]
  if budget == '' then budget = nil end
  if daily == '' then daily = nil end
  if cost == '' then cost = nil end
  if status == '' then status = nil end
  if tz == '' then tz = nil end
  if start == '' then start = nil end
  if stop == '' then stop = nil end
  if pacing == '' then pacing = nil end
  if max_cost == '' then max_cost = nil end
  return {budget = budget, daily_budget = daily, cost = cost, status = status, tz = tz,
    start = start, ['end'] = stop, pacing = pacing, leasing = '', max_cost = max_cost}
end

-- A candidate's stored config over its profile's (ARGV from `at`) and its settings' `caps`
-- (nil: none), or nil when it stores nothing.
local function xsp_config_of(key, at, caps)
  local stored = redis.call('HGETALL', key)
  if #stored == 0 then return nil end
  local c = xsp_fallback(at, ARGV[at + 12])
  if caps then c.caps = caps end
  return xsp_overlay(c, stored)
end

-- A campaign's weight (selection "weighted"): the stored one when it is a whole number in
-- [1, 1000000], else the settings' (`fallback`).
local function xsp_weight(c, fallback)
  local w = tonumber(c.weight)
  if w and w >= 1 and w <= 1000000 then return w end
  return tonumber(fallback) or 1
end

-- Calendar boundaries (ms), computed by the app in the campaign's time zone, so DST is right:
-- "d0,d1,d2,d3|w0,..|m0,.." are consecutive starts of local days, weeks and months around now.
-- The [start, end) of the local day (kind 1), week (2) or month (3) that holds `now`; only
-- that part of the text is read, and a call that asks twice (a daily budget and a 'day' cap)
-- reads it once. nil when the text has no such part.
local xsp_span_text, xsp_span_kind, xsp_span_now, xsp_span_first, xsp_span_last
local function xsp_span(text, kind, now)
  if text == xsp_span_text and kind == xsp_span_kind and now == xsp_span_now then
    return xsp_span_first, xsp_span_last
  end
  local from = 1
  for _ = 2, kind do
    local bar = string.find(text, '|', from, true)
    if not bar then return nil end
    from = bar + 1
  end
  local bar = string.find(text, '|', from, true) or (#text + 1)
  local list = {}
  while from < bar do
    local comma = string.find(text, ',', from, true)
    if not comma or comma > bar then comma = bar end
    list[#list + 1] = tonumber(string.sub(text, from, comma - 1))
    from = comma + 1
  end
  xsp_span_text, xsp_span_kind, xsp_span_now = text, kind, now
  xsp_span_first, xsp_span_last = list[#list - 1], list[#list]
  for i = 1, #list - 1 do
    if list[i] <= now and now < list[i + 1] then
      xsp_span_first, xsp_span_last = list[i], list[i + 1]
      break
    end
  end
  return xsp_span_first, xsp_span_last
end

local XSP_LIFETIME_TTL_MS = 400 * 86400 * 1000

-- "N:window_ms" (rolling), "N:0" (lifetime), "N:day|week|month" (calendar) -> caps as one flat
-- list, three values per cap: N, the time after which an impression counts (`since`; false for
-- a lifetime cap, which counts every impression) and how long the log must keep it.
local function xsp_parse_caps_now(spec, now, bounds_text)
  local caps, at = {}, 1
  while true do
    local _, stop, n, w = string.find(spec, '(%d+):(%w+)', at)
    if not stop then return caps end
    at = stop + 1
    local window, since, keep = tonumber(w), false, 1
    if window == 0 then
      keep = XSP_LIFETIME_TTL_MS
    elseif window then
      since, keep = now - window, window
    else
      local first, last
      local kind = (w == 'day' and 1) or (w == 'week' and 2) or (w == 'month' and 3)
      if kind then first, last = xsp_span(bounds_text or '', kind, now) end
      if first then
        since, keep = first - 1, last - now
      else  -- no boundaries given: count nothing rather than fail the request
        since = now
      end
    end
    local i = #caps
    caps[i + 1], caps[i + 2], caps[i + 3] = tonumber(n), since, keep
  end
end
local xsp_caps_spec, xsp_caps_now, xsp_caps_bounds, xsp_caps_last
local function xsp_parse_caps(spec, now, bounds_text)
  -- Candidates often share caps: the last parse is kept (callers only read it).
  if spec == xsp_caps_spec and now == xsp_caps_now and bounds_text == xsp_caps_bounds then
    return xsp_caps_last
  end
  xsp_caps_spec, xsp_caps_now, xsp_caps_bounds = spec, now, bounds_text
  -- The most common spec, one rolling or lifetime cap ("N:window_ms"), in one anchored match
  -- (the general parse costs about twice as much; several caps fail it at their ',').
  local n, w = string.match(spec, '^(%d+):(%d+)$')
  if n then
    local window = tonumber(w)
    if window == 0 then
      xsp_caps_last = {tonumber(n), false, XSP_LIFETIME_TTL_MS}
    else
      xsp_caps_last = {tonumber(n), now - window, window}
    end
  else
    xsp_caps_last = xsp_parse_caps_now(spec, now, bounds_text)
  end
  return xsp_caps_last
end

-- One field of the user's hash per campaign ('*' for caps across campaigns):
-- "<lifetime count>|<t1>,<t2>,..." with impression times oldest first, or, for the most common
-- log (one impression ever), just "<t1>": Redis keeps a field that is a plain integer in 9
-- bytes instead of 15 (and older logs, always in the first form, read the same).
local function xsp_read_log(raw)
  if not raw then return 0, {} end
  local sep = string.find(raw, '|', 1, true)
  if not sep then
    local t = tonumber(raw)
    if t then return 1, {t} end
    return 0, {}
  end
  local times, from = {}, sep + 1
  while from <= #raw do
    local comma = string.find(raw, ',', from, true) or (#raw + 1)
    times[#times + 1] = tonumber(string.sub(raw, from, comma - 1))
    from = comma + 1
  end
  return tonumber(string.sub(raw, 1, sep - 1)) or 0, times
end

local function xsp_write_log(lifetime, times)
  if lifetime == 1 and #times == 1 then return xsp_int(times[1]) end
  local parts = {}
  for i = 1, #times do parts[i] = xsp_int(times[i]) end
  return xsp_int(lifetime) .. '|' .. table.concat(parts, ',')
end

-- Pending impressions (record_on=beacon) wait in a field of their own, '~' .. the log's field:
-- "t:until:rid,..." (ms, ms, the reservation's id). Each counts against the caps as a logged
-- one does, until its beacon moves it into the log, or until `until` passes: from then it
-- counts for nothing and the next write drops it. `until` is the campaign's pending expiry
-- plus a grace, so a beacon the campaign confirmed in time always finds its entry here.
-- Returns the times still held and their entries (nil when there are none).
local XSP_HOLD_GRACE_MS = 60000

local function xsp_read_pending(raw, now)
  if not raw then return nil, nil end
  local times, kept = {}, {}
  for entry in string.gmatch(raw, '[^,]+') do
    local t, e = string.match(entry, '^(%d+):(%d+)')
    if e and tonumber(e) > now then
      times[#times + 1] = tonumber(t)
      kept[#kept + 1] = entry
    end
  end
  return times, kept
end

-- Take reservation `rid`'s pending entry out of field '~' .. `field`: its time, or false.
local function xsp_pending_take(key, field, rid)
  local name = '~' .. field
  local raw = redis.call('HGET', key, name)
  if not raw then return false end
  local rest, found = {}, false
  for entry in string.gmatch(raw, '[^,]+') do
    local t, r = string.match(entry, '^(%d+):%d+:(.*)$')
    if not found and r == rid then
      found = tonumber(t)
    else
      rest[#rest + 1] = entry
    end
  end
  if #rest == 0 then
    redis.call('HDEL', key, name)
  elseif found then
    redis.call('HSET', key, name, table.concat(rest, ','))
  end
  return found
end

-- Append `now` and keep only what the caps can still need: the newest max(N) times that are
-- young enough for the longest window. Every window's times are among those, because the caps
-- allow no more than N in it. Returns the kept times, how long (ms) the log must live, and,
-- when `report` is set, the times dropped (a cluster's user half hands them back for its undo:
-- it trims with the caps this process last saw, which may be stale).
local function xsp_record(caps, times, now, report)
  local keep, horizon, ttl = 0, 0, 0
  for i = 1, #caps, 3 do
    local since = caps[i + 1]
    if since then
      if caps[i] > keep then keep = caps[i] end
      if now - since > horizon then horizon = now - since end
    end
    if caps[i + 2] > ttl then ttl = caps[i + 2] end
  end
  local count = #times
  if keep > 0 and count == 0 then return {now}, ttl, '' end  -- a first impression
  local kept, dropped = {}, report and {}
  if keep > 0 then
    times[count + 1] = now
    count = count + 1
    local first = count - keep + 1
    for j = 1, count do
      if j >= first and times[j] > now - horizon then
        kept[#kept + 1] = times[j]
      elseif dropped then
        dropped[#dropped + 1] = xsp_int(times[j])
      end
    end
  elseif dropped then
    for j = 1, count do dropped[j] = xsp_int(times[j]) end
  end
  return kept, ttl, dropped and table.concat(dropped, ',') or ''
end

-- Redis 7's PEXPIRE takes NX/GT: one call keeps a TTL alive; older servers (and the embedded
-- store, which reports no version) read it with PTTL first.
local XSP_PEXPIRE_GT = (tonumber(redis.REDIS_VERSION_NUM) or 0) >= 0x070000

-- Check one user log (its stored value `raw`) against its caps; returns (how many more
-- impressions every cap allows after one more now, or -1 if a cap is reached, or false if
-- there are no caps; lifetime, times, caps); times and caps are nil when there are no caps.
-- `pending`: the times of pending impressions (xsp_read_pending), which count as logged ones.
local function xsp_log_check(raw, spec, now, bounds_text, pending)
  if spec == nil or spec == '' then return false, 0, nil, nil end
  local caps = xsp_caps_last
  if spec ~= xsp_caps_spec or now ~= xsp_caps_now or bounds_text ~= xsp_caps_bounds then
    caps = xsp_parse_caps(spec, now, bounds_text)
  end
  -- The most common log, one impression ever ("<t1>", which tonumber reads whole; a longer
  -- log has a '|'), with nothing pending: checked without building its list of times unless
  -- one more may pass (the same counts as below).
  if raw and not pending then
    local t = tonumber(raw)
    if t then
      local remaining = false
      for i = 1, #caps, 3 do
        local since = caps[i + 1]
        local count = (not since or t > since) and 1 or 0
        if count >= caps[i] then return -1, 1, nil, caps end
        local left = caps[i] - count - 1
        if remaining == false or left < remaining then remaining = left end
      end
      return remaining, 1, {t}, caps
    end
  end
  local lifetime, times = xsp_read_log(raw)
  local remaining = false
  for i = 1, #caps, 3 do
    local since, count = caps[i + 1], lifetime
    if since then
      count = 0
      for j = 1, #times do
        if times[j] > since then count = count + 1 end
      end
    end
    if pending then
      for j = 1, #pending do
        if not since or pending[j] > since then count = count + 1 end
      end
    end
    if count >= caps[i] then return -1, lifetime, times, caps end
    local left = caps[i] - count - 1
    if remaining == false or left < remaining then remaining = left end
  end
  return remaining, lifetime, times, caps
end

local function xsp_user_check(key, field, spec, now, bounds_text)
  if spec == nil or spec == '' then return false, 0, nil, nil end
  local got = redis.call('HMGET', key, field, '~' .. field)
  return xsp_log_check(got[1], spec, now, bounds_text, (xsp_read_pending(got[2], now)))
end

-- Remove one impression at `at` from a user log field (a release), and put back the times its
-- write dropped (`restore`, comma-separated ms; optional). Putting back more times than a cap
-- needs only makes it count more, never less.
local function xsp_user_unrecord(key, field, at, restore)
  local raw = redis.call('HGET', key, field)
  if not raw then return end
  local lifetime, times = xsp_read_log(raw)
  for j = #times, 1, -1 do
    if times[j] == at then
      table.remove(times, j)
      break
    end
  end
  if restore and restore ~= '' then
    local have = {}
    for j = 1, #times do have[times[j]] = true end
    for t in string.gmatch(restore, '%d+') do
      local v = tonumber(t)
      if not have[v] then
        times[#times + 1] = v
        have[v] = true
      end
    end
    table.sort(times)
  end
  if lifetime > 0 then lifetime = lifetime - 1 end
  if lifetime == 0 and #times == 0 then
    redis.call('HDEL', key, field)
  else
    redis.call('HSET', key, field, xsp_write_log(lifetime, times))
  end
end

-- Undo the user's half of a reservation (release_user.lua): its impression at `at_s` (ms)
-- out of the logs it wrote (`logs_s`, reserve_user.lua's reply), and the times its write
-- dropped put back (`a4`, `a5`: from the campaign's log and from '*'); a pending
-- reservation's (logs 4 more): `a4` is its id, and its pending entries go.
local function xsp_user_release(key, cid, at_s, logs_s, a4, a5)
  local at, logs = tonumber(at_s), tonumber(logs_s)
  if logs >= 4 then
    logs = logs - 4
    if logs % 2 == 1 then xsp_pending_take(key, cid, a4) end
    if logs >= 2 then xsp_pending_take(key, '*', a4) end
    return
  end
  if logs % 2 == 1 then xsp_user_unrecord(key, cid, at, a4) end
  if logs >= 2 then xsp_user_unrecord(key, '*', at, a5) end
end

-- The pieces of a reservation. reserve.lua runs them all in one script (standalone Redis);
-- on a cluster, reserve_campaign.lua and reserve_user.lua run the campaign's and the user's
-- pieces on their own shards, concurrently.

-- The gates that need no state: a request's own price (`given`) above the campaign's ceiling
-- (reason 12), then its status (3) and flight (5). A reason, or nil.
-- xsp_gate takes the fields (nil: unset), so that candidates sharing a profile are gated
-- once, from their arguments, without a config table.
local function xsp_gate(max_cost, status, start, stop, given, cost, now)
  if max_cost and given and cost > tonumber(max_cost) then return 12 end
  if status == 'paused' then return 3 end
  if (start and now < tonumber(start)) or (stop and now >= tonumber(stop)) then return 5 end
  return nil
end
local function xsp_campaign_gate(c, given, cost, now)
  return xsp_gate(c.max_cost, c.status, c.start, c['end'], given, cost, now)
end

-- The campaign's budget state for one reservation: `k` carries the price, spend and clock
-- between the pieces. cost_s '' means the campaign's own price. With the calendar bounds
-- (`bounds_text`) and a daily budget, the same read brings the local day's spend. Also the
-- gates before any user state, the campaign's status and flight: a reason, or nil.
-- A request's own price (cost_s not '') above the campaign's ceiling is reason 12.
local function xsp_campaign_start(st_key, c, cost_s, now_override, bounds_text)
  local given = cost_s ~= ''
  if not given then cost_s = c.cost or '0' end
  -- Every field in the constructor: a table that grows later is reallocated on the way.
  local k = {cost_s = cost_s, cost = tonumber(cost_s), budget = tonumber(c.budget) or 0,
    now = xsp_now_ms(now_override), fired = 0, day_start = 0, deny_day = 0,
    daily = bounds_text and tonumber(c.daily_budget) or false, day_field = false, spent = 0,
    remaining = 0}
  if k.daily then
    k.day_start, k.day_end = xsp_span(bounds_text, 1, k.now)
    k.day_field = 'day:' .. xsp_int(k.day_start)
    local st = redis.call('HMGET', st_key, 'spent', k.day_field)
    k.spent, k.day_new, k.day_spent = tonumber(st[1] or '0'), not st[2], tonumber(st[2] or '0')
  else
    k.spent = tonumber(redis.call('HGET', st_key, 'spent') or '0')
  end
  k.remaining = k.budget - k.spent
  return k, xsp_campaign_gate(c, given, k.cost, k.now)
end

-- xsp_user_gate's judgement of what it read: `got` holds the user hash's '!o' and '!b' (its
-- first two), the campaign's log (at `ci`) and pending entries (at `pi`; 0: not read yet,
-- then read here, only when the log alone does not reach a cap; -1: none count, because the
-- campaign's config has no pending flag: it never held a pending reservation, or its state
-- was deleted with them, on one server), and the ones across
-- campaigns (at `ui`, `ui + 1`; -1: none), as HMGET answered them (choosing among candidates
-- reads every candidate's log in one HMGET). A denial's `u` holds only what its reply needs
-- (left and personal); a pass gets the whole state, which the commit writes from.
-- The `u` of a decision that uses no user state is only read, so the tables are shared
-- (created on first use: candidates passed over for their caps reuse one).
local xsp_no_user, xsp_untracked, xsp_capped
local function xsp_capped_u()
  xsp_capped = xsp_capped or {key = false, personal = 1, left = 0}
  return xsp_capped
end
local function xsp_user_judge(key, cid, got, ci, pi, ui, camp_spec, camp_bounds, user_spec,
                              user_bounds, now, policy)
  if not key then
    xsp_no_user = xsp_no_user or {key = false, personal = 1, left = -1}
    return nil, xsp_no_user
  end
  local blocked = got[2]
  if blocked and string.find(',' .. blocked .. ',', ',' .. cid .. ',', 1, true) then
    xsp_no_user = xsp_no_user or {key = false, personal = 1, left = -1}
    return 7, xsp_no_user  -- "stop seeing this ad" holds
  end
  if got[1] == '1' and policy ~= 'ignore' then
    xsp_untracked = xsp_untracked or {key = false, personal = 0, left = -1}
    if policy == 'deny' then return 6, xsp_untracked end
    return nil, xsp_untracked  -- no_tracking: no user state
  end
  local camp_held, user_pending, user_held
  local camp_left, camp_life, camp_times, camp_caps =
    xsp_log_check(got[ci], camp_spec, now, camp_bounds, nil)
  if camp_left == -1 then return 1, xsp_capped_u() end  -- pending or not
  local held = got[pi]
  if held == nil and pi == 0 and camp_left ~= false then
    held = redis.call('HGET', key, '~' .. cid)
  end
  if held then
    local pending
    pending, camp_held = xsp_read_pending(held, now)
    camp_left, camp_life, camp_times, camp_caps =
      xsp_log_check(got[ci], camp_spec, now, camp_bounds, pending)
    if camp_left == -1 then return 1, xsp_capped_u() end
  end
  if got[ui + 1] then user_pending, user_held = xsp_read_pending(got[ui + 1], now) end
  local user_left, user_life, user_times, user_caps =
    xsp_log_check(got[ui], user_spec, now, user_bounds, user_pending)
  if user_left == -1 then return 1, xsp_capped_u() end
  local left = -1
  if camp_left ~= false then left = camp_left end
  if user_left ~= false and (left == -1 or user_left < left) then left = user_left end
  return nil, {key = key, personal = 1, left = left,
    fresh = not (got[1] or blocked or got[ci] or held or got[ui] or got[ui + 1]),
    camp_life = camp_life, camp_times = camp_times or false, camp_caps = camp_caps or false,
    user_life = user_life, user_times = user_times or false, user_caps = user_caps or false,
    camp_held = camp_held or false, user_held = user_held or false}
end

-- The user's side: stored preferences (blocked campaigns, opt-out), then the campaign's caps
-- (field = campaign id) and the caps across campaigns (field '*'). Returns a reason (nil: pass)
-- and `u`, what xsp_user_commit writes: u.key is false when the user's state is not used.
-- `held`: false when the campaign's pending entries do not count (see xsp_user_judge).
local function xsp_user_gate(key, cid, camp_spec, camp_bounds, user_spec, user_bounds, now,
                             policy, held)
  if not key then return nil, {key = false, personal = 1, left = -1} end
  -- One read: the preferences and both logs.
  local got
  if user_spec ~= nil and user_spec ~= '' then
    got = redis.call('HMGET', key, '!o', '!b', cid, '~' .. cid, '*', '~*')
  else
    got = redis.call('HMGET', key, '!o', '!b', cid, '~' .. cid)
  end
  return xsp_user_judge(key, cid, got, 3, held and 4 or -1, 5, camp_spec, camp_bounds, user_spec,
    user_bounds, now, policy)
end

-- Extend the user key's TTL to at least ttl; never shorten it (campaigns with longer windows
-- share the user's hash). A key that held none of the fields just read is likely new, so
-- without a TTL: NX sets one where GT never would.
local function xsp_keep_alive(u, ttl)
  if ttl <= 0 then return end
  if XSP_PEXPIRE_GT then
    if u.fresh and redis.call('PEXPIRE', u.key, ttl, 'NX') == 1 then return end
    if redis.call('PEXPIRE', u.key, ttl, 'GT') == 1 or u.fresh then return end
    -- GT did nothing: the TTL is longer already, or there is none (GT treats it as infinite).
    if redis.call('PTTL', u.key) == -1 then redis.call('PEXPIRE', u.key, ttl) end
    return
  end
  local current = redis.call('PTTL', u.key)
  if current < 0 or current < ttl then redis.call('PEXPIRE', u.key, ttl) end
end

-- Write the user's side of a reservation in one HSET; returns the logs written (1: the
-- campaign's, 2: the user's across campaigns; a sum). `report`: keep the times the writes
-- dropped (u.camp_dropped, u.user_dropped) for a cluster's undo.
-- (A pending impression is written by xsp_pending().user_hold instead.)
local function xsp_user_commit(u, cid, now, report)
  if not u.key then return 0 end
  local ttl, logs, camp_log, user_log = 0, 0, false, false
  if u.camp_caps and #u.camp_caps > 0 then
    local kept, dropped
    kept, ttl, dropped = xsp_record(u.camp_caps, u.camp_times, now, report)
    if report then u.camp_dropped = dropped end
    camp_log, logs = xsp_write_log(u.camp_life + 1, kept), 1
  end
  if u.user_caps and #u.user_caps > 0 then
    local kept, user_ttl, dropped
    kept, user_ttl, dropped = xsp_record(u.user_caps, u.user_times, now, report)
    if report then u.user_dropped = dropped end
    user_log, logs = xsp_write_log(u.user_life + 1, kept), logs + 2
    if user_ttl > ttl then ttl = user_ttl end
  end
  if logs == 1 then
    redis.call('HSET', u.key, cid, camp_log)
  elseif logs == 2 then
    redis.call('HSET', u.key, '*', user_log)
  elseif logs == 3 then
    redis.call('HSET', u.key, cid, camp_log, '*', user_log)
  end
  xsp_keep_alive(u, ttl)
  return logs
end

-- Budgets (lifetime, then the local day's) and pacing. A reason, or nil; sets k.fired (the
-- exhaustion this call detected). `k` comes from xsp_campaign_start given the bounds.
local function xsp_campaign_budget(cfg_key, st_key, c, k, allowance_bp)
  local cost, budget, spent = k.cost, k.budget, k.spent
  local daily, day_end, day_spent = k.daily, k.day_end or 0, k.day_spent or 0
  if daily then
    if daily - day_spent < k.remaining then k.remaining = daily - day_spent end
  end
  if c.status == 'exhausted' then return 2 end
  if spent + cost > budget then
    -- Exhausted once what is left cannot pay for the campaign's own price. The hook fires once
    -- per exhaustion: a marker keeps the budget that ran out, so pausing and resuming never
    -- fires it again, while a raised budget that runs out again does.
    if budget - spent < (tonumber(c.cost) or 1) or budget - spent <= 0 then
      redis.call('HSET', cfg_key, 'status', 'exhausted')
      if redis.call('HGET', st_key, 'lx') ~= c.budget then
        redis.call('HSET', st_key, 'lx', c.budget)
        k.fired = 1
      end
    end
    return 2
  end
  if daily and day_spent + cost > daily then
    if daily - day_spent < (tonumber(c.cost) or 1) or daily - day_spent <= 0 then
      if redis.call('HSETNX', st_key, 'dx:' .. xsp_int(k.day_start), 1) == 1 then k.fired = 2 end
    end
    k.deny_day = k.day_start
    return 2
  end
  -- Pacing: spend in the period may not pass the ideal linear curve plus a burst allowance.
  -- The ceiling is a threshold, not an amount: computing it in floating point is fine.
  if c.pacing == 'even' or c.pacing == 'frontloaded' then
    local p_start, p_end, p_budget, p_spent
    if daily then
      p_start, p_end, p_budget, p_spent = k.day_start, day_end, daily, day_spent
    elseif c.start and c['end'] then
      p_start, p_end, p_budget, p_spent = tonumber(c.start), tonumber(c['end']), budget, spent
    end
    if p_start and p_end > p_start then
      local f = (k.now - p_start) / (p_end - p_start)
      local allowance = tonumber(allowance_bp) / 10000
      if c.pacing == 'frontloaded' then allowance = 0.40 - (0.40 - allowance) * f end
      if p_spent + cost > p_budget * (f + allowance) then return 4 end
    end
  end
  return nil
end

-- A denial: counted on the campaign, and the reply (see reserve.lua).
local function xsp_deny(st_key, reason, k, left, personal, leasing)
  redis.call('HINCRBY', st_key, 'n:' .. reason, 1)
  return {0, reason, k.cost, k.remaining, left, k.now, k.fired, k.deny_day, 0, '', personal,
    leasing}
end

-- Write the campaign's side: the spend, the impression, the day's spend. HINCRBY takes the
-- price as the decimal string it came in (formatting a number in Lua costs more than a call).
local function xsp_campaign_commit(st_key, k, counts)
  if k.cost > 0 then
    redis.call('HINCRBY', st_key, 'spent', k.cost_s)
    if k.day_field then redis.call('HINCRBY', st_key, k.day_field, k.cost_s) end
  end
  if counts == '1' then redis.call('HINCRBY', st_key, 'impressions', '1') end
  if k.day_field and (k.day_new or k.cost <= 0) then
    -- The day's first write: keep only today's and yesterday's day fields.
    redis.call('HDEL', st_key, 'day:' .. xsp_int(k.day_start - 2 * 86400000))
  end
end

-- Spend coming back (a release, a lease's unspent units): take `amount_s` (a non-negative
-- integer string) off the spend and off its day's spend (day '0': none), never below zero
-- (the campaign's state may have been reset in between).
local function xsp_give_back(st_key, amount_s, day)
  local amount = tonumber(amount_s)
  for _, field in ipairs({'spent', day ~= '0' and ('day:' .. day) or nil}) do
    local value = tonumber(redis.call('HGET', st_key, field) or '0')
    if value >= amount then redis.call('HINCRBY', st_key, field, '-' .. amount_s) end
  end
end

-- After spend came back: a campaign flipped to exhausted is active again when the budget that
-- ran out ('lx') can pay `need` once more. Otherwise a released last impression (a cluster's
-- compensation, a lease's return) would leave budget unspent for good. The marker goes too, so
-- the exhaustion that really ends the budget fires the hook again.
local function xsp_reactivate(cfg_key, st_key, need)
  if redis.call('HGET', cfg_key, 'status') ~= 'exhausted' then return end
  local ran_out = tonumber(redis.call('HGET', st_key, 'lx') or '')
  local spent = tonumber(redis.call('HGET', st_key, 'spent') or '0')
  if ran_out and ran_out - spent >= need then
    redis.call('HSET', cfg_key, 'status', 'active')
    redis.call('HDEL', st_key, 'lx')
  end
end

-- Pending reservations (record_on=beacon) and used price signatures, per campaign:
-- * `z_key`, a sorted set scored by expiry (ms): 'p' .. rid for a pending reservation,
--   'n' .. nonce for a signature already used;
-- * `pd_key`, a hash: rid -> "cost|day start|user key" (what settling or confirming needs;
--   the user key is empty when the user's state was not touched).
-- A pending reservation holds its spend (counted in `spent`) and its cap slot (the user's
-- pending entry) until its beacon confirms it or it expires. Nothing sweeps them: each reserve
-- call of the campaign first settles what expired (at most XSP_SETTLE_MAX of them, oldest
-- first), so freed budget is there for the very call that settles it.
local XSP_SETTLE_MAX = 64

-- The pieces of pending reservations and price nonces, built only by a call that needs them
-- (one closure to build for every other call, not seven): xsp_pending().settle(...) etc.
local function xsp_pending()
  local p = {}

  -- Give a pending reservation's spend back (its details `d`, from pd_key); false if `d` is
  -- not a pending reservation's.
  function p.unhold(cfg_key, st_key, d, need)
    local cost, day = string.match(d or '', '^(%d+)|(%d+)|')
    if not cost then return false end
    if cost ~= '0' then
      xsp_give_back(st_key, cost, day)
      xsp_reactivate(cfg_key, st_key, need)
      redis.call('HINCRBY', st_key, 'b:held', '-' .. cost)
    end
    return true
  end

  -- Settle what expired; true if it gave anything back (a campaign that had run out may be
  -- active again: c.status is read again).
  function p.settle(cfg_key, st_key, z_key, pd_key, c, now)
    local due = redis.call('ZRANGEBYSCORE', z_key, '-inf', now, 'LIMIT', 0, XSP_SETTLE_MAX)
    if #due == 0 then return end
    local expired, need = 0, tonumber(c.cost) or 1
    for i = 1, #due do
      local m = due[i]
      if string.sub(m, 1, 1) == 'p' then
        local rid = string.sub(m, 2)
        if p.unhold(cfg_key, st_key, redis.call('HGET', pd_key, rid), need) then
          redis.call('HDEL', pd_key, rid)
          expired = expired + 1
        end
      end
    end
    redis.call('ZREM', z_key, unpack(due))
    if expired == 0 then return end
    redis.call('HINCRBY', st_key, 'b:expired', expired)
    if c.status == 'exhausted' then
      c.status = redis.call('HGET', cfg_key, 'status') or c.status
    end
  end

  -- Settle for a call that was given no pending keys (a process under record_on "response"),
  -- when the campaign ever held pending reservations: their keys sit next to its config's, in
  -- the same slot. Returns the call's now (ms).
  function p.settle_any(cfg_key, st_key, c, now_override)
    local now = xsp_now_ms(now_override)
    local tag = string.sub(cfg_key, 1, -4)  -- '<prefix>:c:{id}:'
    p.settle(cfg_key, st_key, tag .. 'z', tag .. 'pd', c, now)
    return now
  end

  -- A price signature's nonce, used once: false if it was used before. It is kept until five
  -- minutes after the signature's expiry (clocks of signers and servers differ).
  function p.nonce(z_key, nonce, expires)
    return redis.call('ZADD', z_key, 'NX', tonumber(expires) + 300000, 'n' .. nonce) == 1
  end

  -- Record a reservation as pending until now + ttl_ms: its details for settling, one more
  -- served under beacons, and its spend in what pending reservations hold ('b:held'). The
  -- config gets 'pending' = '1' once: a process that does not hold reservations (record_on
  -- "response") then still settles them (settle_any), so a switch back never strands spend.
  function p.hold(cfg_key, st_key, z_key, pd_key, c, k, rid, ttl_ms, user_key)
    if c.pending ~= '1' then redis.call('HSET', cfg_key, 'pending', '1') end
    redis.call('ZADD', z_key, k.now + tonumber(ttl_ms), 'p' .. rid)
    redis.call('HSET', pd_key, rid, k.cost_s .. '|' .. xsp_int(k.day_start) .. '|' .. user_key)
    redis.call('HINCRBY', st_key, 'b:served', 1)
    if k.cost > 0 then redis.call('HINCRBY', st_key, 'b:held', k.cost_s) end
  end

  -- xsp_user_commit of a pending impression (`hold`: the ms it is held until): reservation
  -- `rid`'s entry joins the still-held ones (xsp_read_pending), not the log; the key lives as
  -- long as a logged impression would have to, and at least until the hold ends. Returns the
  -- logs written, 4 added.
  function p.user_hold(u, cid, now, hold, rid)
    if not u.key then return 0 end
    local entry, ttl, logs = xsp_int(now) .. ':' .. xsp_int(hold) .. ':' .. rid, hold - now, 0
    local writes = {}
    for _, side in ipairs({{u.camp_caps, u.camp_held, '~' .. cid, 1},
                           {u.user_caps, u.user_held, '~*', 2}}) do
      local caps, held = side[1], side[2] or {}
      if caps and #caps > 0 then
        held[#held + 1] = entry
        writes[#writes + 1] = side[3]
        writes[#writes + 1] = table.concat(held, ',')
        logs = logs + side[4]
        for i = 3, #caps, 3 do
          if caps[i] > ttl then ttl = caps[i] end
        end
      end
    end
    if logs == 0 then return 0 end
    redis.call('HSET', u.key, unpack(writes))
    xsp_keep_alive(u, ttl)
    return logs + 4
  end

  return p
end

-- The start of a reserve call (reserve.lua, reserve_campaign.lua): with extras (ARGV[21..25]),
-- settle what expired, use the price signature's nonce, and say how long it stays pending;
-- without, settle a campaign that ever held pending reservations. Returns the call's now
-- (ms, or the override as given), the hold (ms, or false), the pending pieces (or false), and
-- true when the nonce was used before (reason 13).
local function xsp_reserve_start(c, cfg_key, st_key, z_key, pd_key, now_override)
  if not ARGV[21] then
    if c.pending ~= '1' then return now_override, false, false, false end
    return xsp_pending().settle_any(cfg_key, st_key, c, now_override), false, false, false
  end
  local now, pend = xsp_now_ms(now_override), xsp_pending()
  pend.settle(cfg_key, st_key, z_key, pd_key, c, now)
  if ARGV[22] ~= '' and not pend.nonce(z_key, ARGV[22], ARGV[23]) then
    return now, false, pend, true
  end
  return now, ARGV[24] ~= '' and tonumber(ARGV[24]), pend, false
end
