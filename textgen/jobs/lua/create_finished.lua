-- ARGV: prefix, id, field, value, ... (state and result among the fields): a job that ended now without
-- ever being queued (create_finished); not a runner completion, so not in 'completions'
local id = ARGV[2]
local k = jkey(id)
local seq = redis.call('INCR', zkey('seq'))
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local _, now_s = clock()
redis.call('HSET', k, 'seq', seq, 'finished_at', now_s, unpack(fields))
redis.call('ZADD', zkey('jobs'), seq, id)
redis.call('ZADD', zkey('tenant:' .. (redis.call('HGET', k, 'tenant') or 'anonymous')), seq, id)
redis.call('ZADD', zkey('state:' .. redis.call('HGET', k, 'state')), seq, id)
redis.call('ZADD', zkey('finished'), now_s, id)
return now_s
