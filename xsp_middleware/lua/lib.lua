-- Shared pieces of every xsp script; the store prepends this file to each script body.
-- Rules that keep the scripts exact on Redis and on the embedded store (fakeredis + lupa):
--   * money enters as decimal integer strings (ARGV or HGET) and goes to HINCRBY as such;
--     comparisons use tonumber(), exact because amounts stay below 2^53;
--   * money leaves as integer array elements, never through cjson or tostring();
--   * no struct/bit/cmsgpack, no shebang flags: fakeredis runs plain Lua 5.1.

-- Impression times are milliseconds on the Redis server's clock, so skewed app servers agree.
local function xsp_now_ms(override)
  if override ~= nil and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- "N:window_ms,..." -> {{N, window_ms}, ...}; window 0 is a lifetime cap.
local function xsp_parse_caps(spec)
  local caps = {}
  for n, w in string.gmatch(spec, '(%d+):(%d+)') do
    caps[#caps + 1] = {tonumber(n), tonumber(w)}
  end
  return caps
end

-- One field of the user's hash per campaign: "<lifetime count>|<t1>,<t2>,..." (oldest first).
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
  for i = 1, #times do parts[i] = string.format('%d', times[i]) end
  return string.format('%d', lifetime) .. '|' .. table.concat(parts, ',')
end

-- How many more impressions every cap allows after one more now: -1 if a cap is reached,
-- false if there are no caps. Rolling: count the logged times inside (now - window, now].
local function xsp_check_caps(caps, lifetime, times, now)
  local remaining = false
  for i = 1, #caps do
    local n, w = caps[i][1], caps[i][2]
    local count = 0
    if w == 0 then
      count = lifetime
    else
      local since = now - w
      for j = 1, #times do
        if times[j] > since then count = count + 1 end
      end
    end
    if count >= n then return -1 end
    local left = n - count - 1
    if remaining == false or left < remaining then remaining = left end
  end
  return remaining
end

-- Append `now` and keep only what the rolling caps can still need: the newest max(N) times
-- inside the longest window. The caps guarantee that every window's times are among those.
-- Returns the kept times and how long (ms) the user's hash must live.
local XSP_LIFETIME_TTL_MS = 400 * 86400 * 1000
local function xsp_record(caps, times, now)
  local keep, horizon, lifetime_cap = 0, 0, false
  for i = 1, #caps do
    if caps[i][2] == 0 then
      lifetime_cap = true
    else
      if caps[i][1] > keep then keep = caps[i][1] end
      if caps[i][2] > horizon then horizon = caps[i][2] end
    end
  end
  local kept = {}
  if keep > 0 then
    times[#times + 1] = now
    local first = #times - keep + 1
    if first < 1 then first = 1 end
    for j = first, #times do
      if times[j] > now - horizon then kept[#kept + 1] = times[j] end
    end
  end
  if lifetime_cap then horizon = XSP_LIFETIME_TTL_MS end
  return kept, horizon
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
