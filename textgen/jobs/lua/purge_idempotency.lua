-- ARGV: prefix, older_than_s, idempotency record key, ...
local cutoff = clock() - tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do
  local created = redis.call('HGET', ARGV[i], 'created_at')
  if created and tonumber(created) < cutoff then
    redis.call('DEL', ARGV[i])
    n = n + 1
  end
end
return n
