-- Change one user preference atomically, in the user's hash (the one holding the cap logs):
--   '!o' = '1' when the user opted out (absent otherwise);
--   '!b' = the blocked campaign ids, sorted, comma-separated, no duplicates (absent when none).
-- KEYS[1] the user key. ARGV[1] the operation: 'optout', 'optin', 'block' or 'unblock'.
-- ARGV[2] the campaign id (block, unblock; validated by the app, so it holds no comma).
-- ARGV[3] how long (ms) a preference keeps the hash alive. ARGV[4] the most ids '!b' may hold.
-- Returns {'1' or '', '!b' or '', status}: the preferences after the write, and status 1, or 0
-- when a block was refused because '!b' is full (nothing changed then).
-- Loaded after lib.lua like every script (scripts.py); it runs through EVALSHA/EVAL, also on
-- fakeredis.
local key, op, id = KEYS[1], ARGV[1], ARGV[2]
local keep_ms, most = tonumber(ARGV[3]), tonumber(ARGV[4])
local status = 1

if op == 'optout' then
  redis.call('HSET', key, '!o', '1')
elseif op == 'optin' then
  redis.call('HDEL', key, '!o')
elseif op == 'block' or op == 'unblock' then
  local ids, found = {}, false
  for each in string.gmatch(redis.call('HGET', key, '!b') or '', '[^,]+') do
    if each == id then
      found = true
    else
      ids[#ids + 1] = each
    end
  end
  if op == 'block' then
    if found or #ids < most then
      ids[#ids + 1] = id
    else
      status = 0  -- full: refuse, and leave '!b' as it was
    end
  end
  if status == 1 then
    if #ids == 0 then
      redis.call('HDEL', key, '!b')  -- Redis removes the hash if that was its last field
    else
      table.sort(ids)
      redis.call('HSET', key, '!b', table.concat(ids, ','))
    end
  end
else
  return redis.error_reply('prefs.lua: unknown operation ' .. tostring(op))
end

local opted, blocked = redis.call('HGET', key, '!o'), redis.call('HGET', key, '!b')
-- A preference outlives cap windows: while one is stored, keep the hash alive at least keep_ms.
-- Extend only, never shorten (cap logs may need longer).
if opted or blocked then
  local ttl = redis.call('PTTL', key)
  if ttl < 0 or ttl < keep_ms then
    redis.call('PEXPIRE', key, keep_ms)
  end
end
return {opted or '', blocked or '', status}
