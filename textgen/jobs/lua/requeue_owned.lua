-- ARGV: prefix, owner
local n = 0
for _, id in ipairs(redis.call('ZRANGE', zkey('leases'), 0, -1)) do
  local st = redis.call('HMGET', jkey(id), 'state', 'owner')
  if st[1] == 'running' and st[2] == ARGV[2] then
    requeue(id)
    n = n + 1
  end
end
for _, id in ipairs(redis.call('ZRANGE', zkey('webhooks:claimed'), 0, -1)) do
  local k = jkey(id)
  if redis.call('HGET', k, 'webhook_owner') == ARGV[2] then
    redis.call('HDEL', k, 'webhook_owner', 'webhook_lease_until')
    redis.call('ZREM', zkey('webhooks:claimed'), id)
    redis.call('ZADD', zkey('webhooks:due'), redis.call('HGET', k, 'finished_at'), id)
  end
end
return n
