-- Redis Cluster: undo the user's half of a reservation (see release.lua).
-- KEYS[1] user hash. ARGV[1] campaign id, ARGV[2] reservation time ms, ARGV[3] the logs it
-- wrote (reserve_user.lua's reply), ARGV[4] and ARGV[5] (optional) the times its write dropped
-- from the campaign's log and from '*', to put back. A pending reservation's (logs 4 more):
-- ARGV[4] is its id, and its pending entries go.
xsp_user_release(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return 1
