-- ARGV: prefix, owner, lease_s
local now, now_s = clock()
local due = redis.call('ZRANGE', zkey('webhooks:due'), 0, 0, 'WITHSCORES')
local stale = redis.call('ZRANGEBYSCORE', zkey('webhooks:claimed'), '-inf', '(' .. now_s, 'LIMIT', 0, 1)[1]
local id = due[1]
-- the oldest finished of the two candidates, as SQLite's ORDER BY finished_at
if stale and (not id or tonumber(redis.call('HGET', jkey(stale), 'finished_at')) < tonumber(due[2])) then
  id = stale
end
if not id then return false end
local until_s = fmt(now + tonumber(ARGV[3]))
redis.call('ZREM', zkey('webhooks:due'), id)
redis.call('ZADD', zkey('webhooks:claimed'), until_s, id)
redis.call('HSET', jkey(id), 'webhook_owner', ARGV[2], 'webhook_lease_until', until_s)
return redis.call('HGETALL', jkey(id))
