-- The dashboard's spend history (xsp_middleware/dashboard/history.py): a campaign's counters,
-- copied once a minute into its history stream by a dashboard process, never by a decision.
-- KEYS[1] the campaign's state hash, KEYS[2] its history stream (the same slot).
-- ARGV[1] now override ms ('' = TIME)   ARGV[2] how many samples the stream keeps.
-- The sample's id is its minute's start (ms), so a minute is sampled once, whichever process
-- comes first; its fields are the state's spend, day spends, impressions, denial and beacon
-- counters as they are now, and 't', the time it was taken.
-- Reply: 1 written, 0 this minute had its sample already (or the campaign has no state yet).
local now = xsp_now_ms(ARGV[1])
local minute = now - now % 60000
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last and tonumber(string.match(last[1], '^(%d+)')) >= minute then return 0 end
local state = redis.call('HGETALL', KEYS[1])
if #state == 0 then return 0 end  -- nothing recorded yet: no history either
local entry = {'t', string.format('%d', now)}
for i = 1, #state, 2 do
  local name = state[i]
  if name == 'spent' or name == 'leased' or name == 'impressions' or string.find(name, '^n:')
      or string.find(name, '^day:') or string.find(name, '^b:') then
    entry[#entry + 1] = name
    entry[#entry + 1] = state[i + 1]
  end
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], string.format('%d-0', minute), unpack(entry))
return 1
