-- KEYS: jobs, outcome, open. ARGV: line, job_id, ...
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i]) end
end
return 1
