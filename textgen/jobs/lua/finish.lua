-- ARGV: prefix, id, owner, state, has_result, result, has_error, error
local id = ARGV[2]
local k = jkey(id)
local st = redis.call('HMGET', k, 'state', 'owner')
if st[1] ~= 'running' or st[2] ~= ARGV[3] then return 0 end
local _, now_s = clock()
if ARGV[5] == '1' then redis.call('HSET', k, 'result', ARGV[6]) else redis.call('HDEL', k, 'result') end
if ARGV[7] == '1' then redis.call('HSET', k, 'error', ARGV[8]) else redis.call('HDEL', k, 'error') end
terminate(id, 'running', ARGV[4], now_s)
return 1
