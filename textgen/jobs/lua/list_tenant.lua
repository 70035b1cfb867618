-- ARGV: prefix, tenant, state ('' = any), limit (> 0). Walks the tenant's jobs newest first.
local jobs, start, step = {}, 0, 200
local limit = tonumber(ARGV[4])
while #jobs < limit do
  local ids = redis.call('ZREVRANGE', zkey('tenant:' .. ARGV[2]), start, start + step - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if ARGV[3] == '' or redis.call('HGET', jkey(id), 'state') == ARGV[3] then
      jobs[#jobs + 1] = redis.call('HGETALL', jkey(id))
      if #jobs >= limit then break end
    end
  end
  start = start + step
end
return jobs
