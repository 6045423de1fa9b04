-- Shared pieces of every xsp script; the store prepends this file to each script body.
-- Rules that keep the scripts exact on Redis and on the embedded store (fakeredis + lupa):
--   * money enters as decimal integer strings (ARGV or HGET) and goes to HINCRBY as such;
--     comparisons use tonumber(), exact because amounts stay below 2^53;
--   * money leaves as integer array elements, never through cjson or tostring();
--   * no struct/bit/cmsgpack, no shebang flags: fakeredis runs plain Lua 5.1.

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

-- A campaign's config: each field from its stored hash, else from the settings' fallback,
-- nine ARGV from `at` in the order of XSP_FIELDS; '' means unset.
local XSP_FIELDS = {'budget', 'daily_budget', 'cost', 'caps', 'status', 'tz', 'start', 'end',
  'pacing'}
-- Stored amounts and times must be plain integers: anything else (a hand-edited hash) falls
-- back to the settings' value rather than failing, or worse, parsing as inf.
local XSP_INTEGER = {budget = true, daily_budget = true, cost = true, start = true}
XSP_INTEGER['end'] = true
local function xsp_config(key, at)
  local stored = redis.call('HMGET', key, unpack(XSP_FIELDS))
  local c = {}
  for i = 1, #XSP_FIELDS do
    local name, v = XSP_FIELDS[i], stored[i]
    if v and v ~= '' and XSP_INTEGER[name] and not string.match(v, '^%d+$') then v = false end
    if not v then v = ARGV[at + i - 1] end
    if v == '' then v = nil end
    c[name] = v
  end
  return c
end

-- Calendar boundaries (ms), computed by the app in the campaign's time zone, so DST is right:
-- "d0,d1,d2,d3|w0,..|m0,.." are consecutive starts of local days, weeks and months around now.
local function xsp_bounds(text)
  local parts = xsp_split(text, '|')
  local b = {}
  local names = {'day', 'week', 'month'}
  for i = 1, 3 do
    local list = {}
    for n in string.gmatch(parts[i] or '', '%d+') do list[#list + 1] = tonumber(n) end
    b[names[i]] = list
  end
  return b
end

-- The [start, end) of the period that holds `now`.
local function xsp_period(list, now)
  for i = 1, #list - 1 do
    if list[i] <= now and now < list[i + 1] then return list[i], list[i + 1] end
  end
  return list[#list - 1], list[#list]
end

local XSP_LIFETIME_TTL_MS = 400 * 86400 * 1000

-- "N:window_ms" (rolling), "N:0" (lifetime), "N:day|week|month" (calendar) -> caps with the
-- time after which an impression counts (`since`, nil for lifetime) and how long the log must
-- keep it (`keep_ms`).
local function xsp_parse_caps(spec, now, bounds_text)
  local caps, bounds = {}, nil
  for n, w in string.gmatch(spec, '(%d+):(%w+)') do
    local cap = {n = tonumber(n)}
    local window = tonumber(w)
    if window == 0 then
      cap.keep_ms = XSP_LIFETIME_TTL_MS
    elseif window then
      cap.since = now - window
      cap.keep_ms = window
    else
      bounds = bounds or xsp_bounds(bounds_text)
      local first, last = xsp_period(bounds[w] or {}, now)
      if first then
        cap.since = first - 1
        cap.keep_ms = last - now
      else  -- no boundaries given: count nothing rather than fail the request
        cap.since = now
        cap.keep_ms = 1
      end
    end
    caps[#caps + 1] = cap
  end
  return caps
end

-- One field of the user's hash per campaign ('*' for caps across campaigns):
-- "<lifetime count>|<t1>,<t2>,..." with impression times oldest first.
local function xsp_read_log(raw)
  local times = {}
  if not raw then return 0, times end
  local sep = string.find(raw, '|', 1, true)
  if not sep then return 0, times end
  for t in string.gmatch(string.sub(raw, sep + 1), '%d+') do
    times[#times + 1] = tonumber(t)
  end
  return tonumber(string.sub(raw, 1, sep - 1)) or 0, times
end

local function xsp_write_log(lifetime, times)
  local parts = {}
  for i = 1, #times do parts[i] = xsp_int(times[i]) end
  return xsp_int(lifetime) .. '|' .. table.concat(parts, ',')
end

-- How many more impressions every cap allows after one more now: -1 if a cap is reached,
-- false if there are no caps.
local function xsp_check_caps(caps, lifetime, times)
  local remaining = false
  for i = 1, #caps do
    local cap = caps[i]
    local count = 0
    if cap.since == nil then
      count = lifetime
    else
      for j = 1, #times do
        if times[j] > cap.since then count = count + 1 end
      end
    end
    if count >= cap.n then return -1 end
    local left = cap.n - count - 1
    if remaining == false or left < remaining then remaining = left end
  end
  return remaining
end

-- Append `now` and keep only what the caps can still need: the newest max(N) times that are
-- young enough for the longest window. Every window's times are among those, because the caps
-- allow no more than N in it. Returns the kept times, how long (ms) the log must live, and the
-- times dropped (a cluster's user half hands them back for its undo: it trims with the caps
-- this process last saw, which may be stale).
local function xsp_record(caps, times, now)
  local keep, horizon, ttl = 0, 0, 0
  for i = 1, #caps do
    local cap = caps[i]
    if cap.since ~= nil then
      if cap.n > keep then keep = cap.n end
      if now - cap.since > horizon then horizon = now - cap.since end
    end
    if cap.keep_ms > ttl then ttl = cap.keep_ms end
  end
  local kept, dropped = {}, {}
  if keep > 0 then
    times[#times + 1] = now
    local first = #times - keep + 1
    if first < 1 then first = 1 end
    for j = 1, #times do
      if j >= first and times[j] > now - horizon then
        kept[#kept + 1] = times[j]
      else
        dropped[#dropped + 1] = xsp_int(times[j])
      end
    end
  else
    for j = 1, #times do dropped[j] = xsp_int(times[j]) end
  end
  return kept, ttl, table.concat(dropped, ',')
end

-- Extend a key's TTL to at least ttl_ms; never shorten it (campaigns with longer windows
-- share the user's hash).
local function xsp_keep_alive(key, ttl_ms)
  if ttl_ms <= 0 then return end
  local current = redis.call('PTTL', key)
  if current < 0 or current < ttl_ms then
    redis.call('PEXPIRE', key, ttl_ms)
  end
end

-- Check one user log field against its caps; returns (remaining or -1 or false, lifetime,
-- times, caps).
local function xsp_user_check(key, field, spec, now, bounds_text)
  if spec == nil or spec == '' then return false, 0, {}, {} end
  local caps = xsp_parse_caps(spec, now, bounds_text)
  local lifetime, times = xsp_read_log(redis.call('HGET', key, field))
  return xsp_check_caps(caps, lifetime, times), lifetime, times, caps
end

local function xsp_user_record(key, field, caps, lifetime, times, now)
  if #caps == 0 then return 0, '' end
  local kept, ttl, dropped = xsp_record(caps, times, now)
  redis.call('HSET', key, field, xsp_write_log(lifetime + 1, kept))
  return ttl, dropped
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

-- The pieces of a reservation. reserve.lua runs them all in one script (standalone Redis);
-- on a cluster, reserve_campaign.lua and reserve_user.lua run the campaign's and the user's
-- pieces on their own shards, concurrently.

-- The campaign's budget state for one reservation: `k` carries the price, spend and clock
-- between the pieces. cost_s '' means the campaign's own price.
local function xsp_campaign_start(st_key, c, cost_s, now_override)
  if cost_s == '' then cost_s = c.cost or '0' end
  local k = {cost_s = cost_s, cost = tonumber(cost_s), budget = tonumber(c.budget) or 0,
    now = xsp_now_ms(now_override), fired = 0, day_start = 0, deny_day = 0}
  k.spent = tonumber(redis.call('HGET', st_key, 'spent') or '0')
  k.remaining = k.budget - k.spent
  return k
end

-- Gates before any user state: the campaign's status and flight. A reason, or nil.
local function xsp_campaign_open(c, k)
  if c.status == 'paused' then return 3 end
  if (c.start and k.now < tonumber(c.start)) or (c['end'] and k.now >= tonumber(c['end'])) then
    return 5
  end
  return nil
end

-- The user's side: stored preferences (blocked campaigns, opt-out), then the campaign's caps
-- (field = campaign id) and the caps across campaigns (field '*'). Returns a reason (nil: pass)
-- and `u`, what xsp_user_commit writes: u.key is nil when the user's state is not used.
local function xsp_user_gate(key, cid, camp_spec, camp_bounds, user_spec, user_bounds, now,
                             policy)
  local u = {key = key, personal = 1, left = -1}
  if not key then return nil, u end
  local prefs = redis.call('HMGET', key, '!o', '!b')
  if prefs[2] and string.find(',' .. prefs[2] .. ',', ',' .. cid .. ',', 1, true) then
    return 7, u  -- "stop seeing this ad" holds whatever else the user chose
  end
  if prefs[1] == '1' and policy ~= 'ignore' then
    u.personal = 0
    if policy == 'deny' then return 6, u end
    u.key = nil  -- no_tracking: serve without reading or writing the user's state
    return nil, u
  end
  local camp_left, user_left
  camp_left, u.camp_life, u.camp_times, u.camp_caps =
    xsp_user_check(key, cid, camp_spec, now, camp_bounds)
  if camp_left == -1 then u.left = 0 return 1, u end
  user_left, u.user_life, u.user_times, u.user_caps =
    xsp_user_check(key, '*', user_spec, now, user_bounds)
  if user_left == -1 then u.left = 0 return 1, u end
  for _, l in ipairs({camp_left, user_left}) do
    if l ~= false and (u.left == -1 or l < u.left) then u.left = l end
  end
  return nil, u
end

-- Write the user's side of a reservation; returns the logs written (1: the campaign's, 2: the
-- user's across campaigns; a sum).
local function xsp_user_commit(u, cid, now)
  if not u.key then return 0 end
  local ttl, user_ttl
  ttl, u.camp_dropped = xsp_user_record(u.key, cid, u.camp_caps, u.camp_life, u.camp_times, now)
  user_ttl, u.user_dropped =
    xsp_user_record(u.key, '*', u.user_caps, u.user_life, u.user_times, now)
  local logs = 0
  if #u.camp_caps > 0 then logs = logs + 1 end
  if #u.user_caps > 0 then logs = logs + 2 end
  if user_ttl > ttl then ttl = user_ttl end
  xsp_keep_alive(u.key, ttl)
  return logs
end

-- Budgets (lifetime, then the local day's) and pacing. A reason, or nil; sets k.fired (the
-- exhaustion this call detected) and k.day_start.
local function xsp_campaign_budget(cfg_key, st_key, c, k, bounds_text, allowance_bp)
  local cost, budget, spent = k.cost, k.budget, k.spent
  local daily = tonumber(c.daily_budget)
  local day_end, day_spent = 0, 0
  if daily then
    k.day_start, day_end = xsp_period(xsp_bounds(bounds_text).day, k.now)
    k.day_field = 'day:' .. xsp_int(k.day_start)
    day_spent = tonumber(redis.call('HGET', st_key, k.day_field) or '0')
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

-- Write the campaign's side: the spend, the impression, the day's spend.
local function xsp_campaign_commit(st_key, k, counts)
  if k.cost > 0 then redis.call('HINCRBY', st_key, 'spent', k.cost_s) end
  if counts == '1' then redis.call('HINCRBY', st_key, 'impressions', 1) end
  if k.day_field then
    if k.cost > 0 then redis.call('HINCRBY', st_key, k.day_field, k.cost_s) end
    -- Keep only today's and yesterday's day fields.
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
