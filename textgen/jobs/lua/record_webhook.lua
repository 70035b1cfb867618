-- ARGV: prefix, id, owner, state, attempts, has_error, error
local id = ARGV[2]
local k = jkey(id)
local st = redis.call('HMGET', k, 'webhook_state', 'webhook_owner')
if st[1] ~= 'pending' or st[2] ~= ARGV[3] then return 0 end
local _, now_s = clock()
redis.call('HSET', k, 'webhook_state', ARGV[4], 'webhook_attempts', ARGV[5], 'webhook_at', now_s)
if ARGV[6] == '1' then redis.call('HSET', k, 'webhook_error', ARGV[7]) else redis.call('HDEL', k, 'webhook_error') end
if ARGV[4] ~= 'pending' then
  redis.call('HDEL', k, 'webhook_owner', 'webhook_lease_until')
  redis.call('ZREM', zkey('webhooks:claimed'), id)
end
return 1
