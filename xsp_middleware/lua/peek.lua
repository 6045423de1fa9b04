-- Read-only: would one more impression pass the user's caps now? Writes nothing.
-- KEYS[1] campaign config hash, KEYS[2] user hash. ARGV[1] campaign id, ARGV[2] fallback
-- config, ARGV[3] campaign calendar bounds, ARGV[4] now override ('' = TIME), ARGV[5] user
-- caps across campaigns, ARGV[6] their calendar bounds.
-- Reply: {1 allowed / 0 capped, remaining impressions after one more (-1: no caps)}
local c = xsp_config(KEYS[1], ARGV[2])
local now = xsp_now_ms(ARGV[4])
local left = -1
for _, spec in ipairs({{ARGV[1], c.caps, ARGV[3]}, {'*', ARGV[5], ARGV[6]}}) do
  local l = xsp_user_check(KEYS[2], spec[1], spec[2], now, spec[3])
  if l == -1 then return {0, 0} end
  if l ~= false and (left == -1 or l < left) then left = l end
end
return {1, left}
