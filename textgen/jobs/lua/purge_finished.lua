-- ARGV: prefix, older_than_s, batch size
local now = clock()
local ids = redis.call('ZRANGEBYSCORE', zkey('finished'), '-inf', '(' .. fmt(now - tonumber(ARGV[2])),
  'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local st = redis.call('HMGET', jkey(id), 'state', 'idem_key', 'tenant')
  -- the key's record goes with its job, unless the key was re-pointed at a newer job since
  if st[2] and redis.call('HGET', zkey('idem:' .. st[2]), 'job_id') == id then
    redis.call('DEL', zkey('idem:' .. st[2]))
  end
  redis.call('DEL', jkey(id))
  redis.call('ZREM', zkey('tenant:' .. (st[3] or 'anonymous')), id)
  for _, z in ipairs({'jobs', 'queued', 'leases', 'finished', 'completions', 'webhooks:due', 'webhooks:claimed'}) do
    redis.call('ZREM', zkey(z), id)
  end
  if st[1] then redis.call('ZREM', zkey('state:' .. st[1]), id) end
end
return #ids
