-- ARGV: prefix, id, owner
local k = jkey(ARGV[2])
local st = redis.call('HMGET', k, 'state', 'owner')
if st[1] ~= 'running' or st[2] ~= ARGV[3] then return 0 end
requeue(ARGV[2])
redis.call('HINCRBY', k, 'attempts', -1)
return 1
