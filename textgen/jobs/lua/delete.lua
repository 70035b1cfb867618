-- ARGV: prefix, id, tenant ('' = any): {'missing'} | {'live'} | {'deleted', fields}
local id = ARGV[2]
local k = jkey(id)
local fields = redis.call('HGETALL', k)
if #fields == 0 then return {'missing'} end
local st = redis.call('HMGET', k, 'state', 'idem_key', 'tenant')
local tenant = st[3] or 'anonymous'
if ARGV[3] ~= '' and tenant ~= ARGV[3] then return {'missing'} end
if st[1] == 'queued' or st[1] == 'running' then return {'live'} end
if st[2] and redis.call('HGET', zkey('idem:' .. st[2]), 'job_id') == id then
  redis.call('DEL', zkey('idem:' .. st[2]))
end
redis.call('DEL', k)
redis.call('ZREM', zkey('tenant:' .. tenant), id)
redis.call('ZREM', zkey('state:' .. st[1]), id)
for _, z in ipairs({'jobs', 'queued', 'leases', 'finished', 'completions', 'webhooks:due', 'webhooks:claimed'}) do
  redis.call('ZREM', zkey(z), id)
end
return {'deleted', fields}
