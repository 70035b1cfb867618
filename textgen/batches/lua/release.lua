-- KEYS: batch hash, due zset. ARGV: worker, id, next_check_at, done (0/1)
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_until')
if ARGV[4] == '1' then redis.call('ZREM', KEYS[2], ARGV[2]) else redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2]) end
return 1
