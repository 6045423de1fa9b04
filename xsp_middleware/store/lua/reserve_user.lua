-- Redis Cluster: the user's half of a reservation, on the user's shard (see
-- reserve_campaign.lua): stored preferences, the caps, and the impression's time in the logs.
-- KEYS[1] user hash. ARGV[1] campaign id   ARGV[2] the campaign's caps ("N:window" specs)
-- ARGV[3] campaign calendar bounds   ARGV[4] user caps across campaigns   ARGV[5] their bounds
-- ARGV[6] now override ms ('' = TIME)   ARGV[7] what a stored opt-out does (see reserve.lua)
-- ARGV[8], ARGV[9] (optional; '' none): how long (ms) the reservation stays pending, and its
-- id: the impression is written as a pending entry (logs gets 4 added).
-- ARGV[10..14] (optional): another candidate's user half to undo first, in the same atomic
-- step (choosing among candidates on a cluster): its campaign id, time, logs and the two
-- values release_user.lua takes, so that its impression never counts against this one.
-- Reply: {passed 1/0, reason (0, or 1 frequency_capped, 6 no_consent, 7 user_blocked),
--   remaining impressions (-1: no caps), time ms, logs written, 1 if the user's state was used,
--   the times (ms, comma-separated) the write dropped from the campaign's log and from '*'}:
-- the caps came from the app's cache, so an undo puts those times back (release_user.lua).
-- (Pending: the reservation's id instead of the first, which its undo needs.)
if ARGV[10] then xsp_user_release(KEYS[1], ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]) end
local now = xsp_now_ms(ARGV[6])
local reason, u = xsp_user_gate(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], now,
  ARGV[7], true)
if reason then return {0, reason, u.left, now, 0, u.personal, '', ''} end
if ARGV[8] and ARGV[8] ~= '' then
  local hold = now + tonumber(ARGV[8]) + XSP_HOLD_GRACE_MS
  local logs = xsp_pending().user_hold(u, ARGV[1], now, hold, ARGV[9])
  return {1, 0, u.left, now, logs, u.personal, ARGV[9], ''}
end
local logs = xsp_user_commit(u, ARGV[1], now, true)
return {1, 0, u.left, now, logs, u.personal, u.camp_dropped or '', u.user_dropped or ''}
