-- KEYS: batch hash. ARGV: worker, status, data
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'data', ARGV[3])
return 1
