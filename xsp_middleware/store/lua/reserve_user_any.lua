-- Redis Cluster: the user's half of choosing among candidates (see reserve_any.lua), on the
-- user's shard: every candidate's user checks (stored preferences, its caps, the caps across
-- campaigns), and the impression of candidate `p` written if it passes (its campaign's half
-- runs concurrently on its own shard; the other candidates' campaigns are checked there).
-- KEYS[1] user hash. ARGV[1] the number of candidates   ARGV[2] p ('0': write none)
-- ARGV[3] user caps across campaigns   ARGV[4] their bounds   ARGV[5] now override ms ('' =
-- TIME)   ARGV[6] what a stored opt-out does   ARGV[7] how long (ms) the reservation stays
-- pending ('': it stands)   ARGV[8] its id. Then three per candidate, from at = 9 + 3 (i - 1): its id, its caps
-- ("N:window" specs), its calendar bounds.
-- Reply: reserve_user.lua's eight elements for the candidate written (passed 0 when none
-- was), each candidate's reason code in order (0: it passes the user's checks; one
-- character each, as reserve_any.lua's outcomes),
-- the index of the candidate written (0: none), and each candidate's remaining impressions
-- after one more (-1: no caps; an array).
local n, p, key = tonumber(ARGV[1]), tonumber(ARGV[2]), KEYS[1]
local now = xsp_now_ms(ARGV[5])
local outcomes, lefts, w, wu, personal = {}, {}, 0, nil, 1
for i = 1, n do
  local at = 9 + 3 * (i - 1)
  local reason, u = xsp_user_gate(key, ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[3], ARGV[4],
    now, ARGV[6], true)
  outcomes[i] = 48 + (reason or 0)
  lefts[i] = u.left
  personal = u.personal
  if not reason and i == p then w, wu = i, u end
end
local tail, room = string.char(unpack(outcomes)), lefts
if w == 0 then return {0, 0, -1, now, 0, personal, '', '', tail, 0, room} end
local cid, u = ARGV[9 + 3 * (w - 1)], wu
if ARGV[7] ~= '' then
  local hold = now + tonumber(ARGV[7]) + XSP_HOLD_GRACE_MS
  local logs = xsp_pending().user_hold(u, cid, now, hold, ARGV[8])
  return {1, 0, u.left, now, logs, u.personal, ARGV[8], '', tail, w, room}
end
local logs = xsp_user_commit(u, cid, now, true)
return {1, 0, u.left, now, logs, u.personal, u.camp_dropped or '', u.user_dropped or '', tail, w,
  room}
