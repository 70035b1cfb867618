-- ARGV: prefix, owner, ... (owners known to be dead)
local dead = {}
for i = 2, #ARGV do dead[ARGV[i]] = true end
local n = 0
for _, id in ipairs(redis.call('ZRANGE', zkey('leases'), 0, -1)) do
  local st = redis.call('HMGET', jkey(id), 'state', 'owner')
  if st[1] == 'running' and st[2] and dead[st[2]] then
    redis.call('HSET', jkey(id), 'lease_until', '0')
    redis.call('ZADD', zkey('leases'), 0, id)
    n = n + 1
  end
end
return n
