-- ARGV: prefix, owner, lease_s
local id = redis.call('ZRANGE', zkey('queued'), 0, 0)[1]
if not id then return false end
local now, now_s = clock()
local until_s = fmt(now + tonumber(ARGV[3]))
local k = jkey(id)
redis.call('ZREM', zkey('queued'), id)
move(id, 'queued', 'running')
redis.call('HSET', k, 'owner', ARGV[2], 'started_at', now_s, 'lease_until', until_s)
redis.call('HINCRBY', k, 'attempts', 1)
redis.call('ZADD', zkey('leases'), until_s, id)
return redis.call('HGETALL', k)
