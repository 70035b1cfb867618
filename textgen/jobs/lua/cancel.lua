-- ARGV: prefix, id, tenant ('' = any)
local id = ARGV[2]
local st = redis.call('HGET', jkey(id), 'state')
if not st then return {'missing'} end
if ARGV[3] ~= '' and (redis.call('HGET', jkey(id), 'tenant') or 'anonymous') ~= ARGV[3] then return {'missing'} end
if st ~= 'queued' and st ~= 'running' then return {'ended'} end
local _, now_s = clock()
terminate(id, st, 'cancelled', now_s)
return {'ok', redis.call('HGETALL', jkey(id))}
