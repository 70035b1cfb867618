-- ARGV: prefix, within_s, limit (> 0)
local now = clock()
return redis.call('ZREVRANGEBYSCORE', zkey('completions'), '+inf', fmt(now - tonumber(ARGV[2])),
  'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
