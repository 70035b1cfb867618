-- KEYS: all, cid, custom. ARGV: line, custom_id, line, custom_id, ...
local duplicates = {}
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i + 1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i])
  elseif redis.call('HGET', KEYS[2], ARGV[i + 1]) ~= ARGV[i] then
    duplicates[#duplicates + 1] = ARGV[i]
  end
end
return duplicates
