-- Read-only: would one more impression pass the user's caps now? Writes nothing.
-- KEYS[1] campaign config hash, KEYS[2] user hash. ARGV[1] campaign id, ARGV[2..10] fallback
-- config, ARGV[11] campaign calendar bounds, ARGV[12] now override ('' = TIME), ARGV[13] user
-- caps across campaigns, ARGV[14] their calendar bounds.
-- Reply: {1 allowed / 0 capped, remaining impressions after one more (-1: no caps)}
local c = xsp_config(KEYS[1], 2)
local now = xsp_now_ms(ARGV[12])
local left = -1
for _, spec in ipairs({{ARGV[1], c.caps, ARGV[11]}, {'*', ARGV[13], ARGV[14]}}) do
  local l = xsp_user_check(KEYS[2], spec[1], spec[2], now, spec[3])
  if l == -1 then return {0, 0} end
  if l ~= false and (left == -1 or l < left) then left = l end
end
return {1, left}
