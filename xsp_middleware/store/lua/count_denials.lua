-- Add the denials the app counted for one campaign (candidates it passed over), in one call.
-- KEYS[1] the campaign's state hash. ARGV: pairs of (counter field 'n:<reason code>', how
-- many to add: a positive integer string).
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
