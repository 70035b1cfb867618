-- KEYS[1]: the key's hash for this window. ARGV: rpm, tpm, expiry_s, requests to add, tokens to add.
-- Returns the overrun budget, or nil after counting: check and count in one script, so concurrent
-- acquires and reservations never overshoot (the same rule as ``_over_limit``).
local counts = redis.call('HMGET', KEYS[1], 'requests', 'tokens')
local requests, tokens = tonumber(counts[1] or '0'), tonumber(counts[2] or '0')
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local add_requests, add_tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
if add_requests > 0 and rpm > 0 and requests + add_requests > rpm then return 'requests' end
if add_tokens > 0 and tpm > 0 then
  if add_tokens > tpm then return 'budget' end
  if tokens + add_tokens > tpm then return 'tokens' end
end
if add_requests > 0 then redis.call('HINCRBY', KEYS[1], 'requests', add_requests) end
if add_tokens > 0 then redis.call('HINCRBY', KEYS[1], 'tokens', add_tokens) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return false
