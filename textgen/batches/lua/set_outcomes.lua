-- KEYS: outcome, open, counts. ARGV: line, outcome, ...
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1)
  end
  redis.call('ZREM', KEYS[2], ARGV[i])
end
return 1
