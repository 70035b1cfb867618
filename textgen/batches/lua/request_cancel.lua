-- KEYS: batch hash, due zset. ARGV: id, now, active statuses...
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 3, #ARGV do
  if status == ARGV[i] then
    redis.call('HSETNX', KEYS[1], 'cancel_requested_at', ARGV[2])
    redis.call('ZADD', KEYS[2], 0, ARGV[1])
    return 1
  end
end
return 1
