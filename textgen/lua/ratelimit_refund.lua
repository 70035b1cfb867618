-- KEYS[1]: the key's hash for the reservation's window. ARGV: tokens to give back (never below 0).
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local back = math.min(tokens, tonumber(ARGV[1]))
if back > 0 then redis.call('HINCRBY', KEYS[1], 'tokens', -back) end
return back
