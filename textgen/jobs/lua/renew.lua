-- ARGV: prefix, owner, lease_s, id, ...
local now = clock()
local until_s = fmt(now + tonumber(ARGV[3]))
local held = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local st = redis.call('HMGET', jkey(id), 'state', 'owner')
  if st[1] == 'running' and st[2] == ARGV[2] then
    redis.call('HSET', jkey(id), 'lease_until', until_s)
    redis.call('ZADD', zkey('leases'), until_s, id)
    held[#held + 1] = id
  end
end
return held
