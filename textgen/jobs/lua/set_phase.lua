-- ARGV: prefix, id, owner, has_phase, phase
local k = jkey(ARGV[2])
local st = redis.call('HMGET', k, 'state', 'owner')
if st[1] ~= 'running' or st[2] ~= ARGV[3] then return 0 end
if ARGV[4] == '1' then redis.call('HSET', k, 'phase', ARGV[5]) else redis.call('HDEL', k, 'phase') end
return 1
