-- Redis Cluster: the stored time zone and caps of a campaign (for peek_user.lua).
-- KEYS[1] campaign config hash. ARGV[2..10] fallback config (see xsp_config).
-- Reply: {time zone, caps ('' for none)}
local c = xsp_config(KEYS[1], 2)
return {c.tz or 'UTC', c.caps or ''}
