-- A pending reservation on its user's side (see reserve_user.lua): confirm moves its pending
-- entries into the logs (the impression now counts as any other); release drops them.
-- KEYS[1] user hash. ARGV[1] 'confirm' or 'release', ARGV[2] campaign id, ARGV[3] the
-- reservation's id. Reply: how many entries were found (0 to 2).
local found = 0
for _, field in ipairs({ARGV[2], '*'}) do
  local at = xsp_pending_take(KEYS[1], field, ARGV[3])
  if at then
    found = found + 1
    if ARGV[1] == 'confirm' then
      local lifetime, times = xsp_read_log(redis.call('HGET', KEYS[1], field))
      local j = #times + 1
      while j > 1 and times[j - 1] > at do
        times[j] = times[j - 1]
        j = j - 1
      end
      times[j] = at
      redis.call('HSET', KEYS[1], field, xsp_write_log(lifetime + 1, times))
    end
  end
end
return found
