-- KEYS: file, all files, expiry. ARGV: prefix, id
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
local record = cjson.decode(old)
local P, id, owner = ARGV[1], ARGV[2], record['owner']
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', P .. ':bfiles:' .. owner, id)
redis.call('HINCRBY', P .. ':bfusage:' .. owner, 'files', -1)
redis.call('HINCRBY', P .. ':bfusage:' .. owner, 'bytes', -math.floor(tonumber(record['bytes']) or 0))
return 1
