-- Redis Cluster: undo the user's half of a reservation (see release.lua).
-- KEYS[1] user hash. ARGV[1] campaign id, ARGV[2] reservation time ms, ARGV[3] the logs it
-- wrote (reserve_user.lua's reply), ARGV[4] and ARGV[5] (optional) the times its write dropped
-- from the campaign's log and from '*', to put back. A pending reservation's (logs 4 more):
-- ARGV[4] is its id, and its pending entries go.
local at, logs = tonumber(ARGV[2]), tonumber(ARGV[3])
if logs >= 4 then
  logs = logs - 4
  if logs % 2 == 1 then xsp_pending_take(KEYS[1], ARGV[1], ARGV[4]) end
  if logs >= 2 then xsp_pending_take(KEYS[1], '*', ARGV[4]) end
  return 1
end
if logs % 2 == 1 then xsp_user_unrecord(KEYS[1], ARGV[1], at, ARGV[4]) end
if logs >= 2 then xsp_user_unrecord(KEYS[1], '*', at, ARGV[5]) end
return 1
