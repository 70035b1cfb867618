-- Lease up to ``limit`` batches that are due and whose lease is free or has run out, least recently
-- looked at first. Due times (``next_check_at``) are set on the coordinators' clock, so ``due_now`` is
-- that clock's reading; leases are on the server's clock (TIME), like the job store's, so replicas whose
-- clocks disagree still agree on when a lease ran out. ``fake_now`` (a store with an injected clock:
-- tests) stands in for the server's clock unless it is ''.
-- ARGV: prefix, worker, due_now, lease_s, limit, fake_now
local P, worker, due_now, lease_s, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now
if ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- Lua numbers would reach Redis as '%.17g': format the lease as the job store does
local lease_until = string.format('%.6f', now + lease_s)
local ids = redis.call('ZRANGEBYSCORE', P .. ':batches:due', '-inf', due_now, 'LIMIT', 0, limit * 4)
local out = {}
for _, id in ipairs(ids) do
  if #out >= limit then break end
  local k = P .. ':batch:' .. id
  local held = tonumber(redis.call('HGET', k, 'lease_until') or '0')
  if held < now and redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'lease_owner', worker, 'lease_until', lease_until)
    out[#out + 1] = id
  end
end
return out
