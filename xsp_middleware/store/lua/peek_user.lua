-- Redis Cluster: peek.lua's question on the user's shard alone. Writes nothing.
-- KEYS[1] user hash. ARGV[1] campaign id, ARGV[2] the campaign's caps, ARGV[3] campaign
-- calendar bounds, ARGV[4] now override ('' = TIME), ARGV[5] user caps across campaigns,
-- ARGV[6] their calendar bounds.
-- Reply: {1 allowed / 0 capped, remaining impressions after one more (-1: no caps)}
local now = xsp_now_ms(ARGV[4])
local left = -1
for _, spec in ipairs({{ARGV[1], ARGV[2], ARGV[3]}, {'*', ARGV[5], ARGV[6]}}) do
  local l = xsp_user_check(KEYS[1], spec[1], spec[2], now, spec[3])
  if l == -1 then return {0, 0} end
  if l ~= false and (left == -1 or l < left) then left = l end
end
return {1, left}
