local P = ARGV[1]
local function jkey(id) return P .. ':job:' .. id end
local function zkey(name) return P .. ':' .. name end
-- the server clock: (seconds as a number, the same as an exact string with microseconds), unless a
-- store with an injected clock (tests) wrote its reading to {prefix}:clock just before this call
local function clock()
  local fake = redis.call('GET', P .. ':clock')
  if fake then
    local f = tonumber(fake)
    return f, string.format('%.6f', f)
  end
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  return tonumber(t[1]) + us / 1000000, t[1] .. '.' .. string.format('%06d', us)
end
-- Lua numbers would reach Redis as '%.17g' (or be truncated to integers in replies): format them
local function fmt(x) return string.format('%.6f', x) end
local function move(id, from, to)
  local seq = redis.call('HGET', jkey(id), 'seq')
  redis.call('ZREM', zkey('state:' .. from), id)
  redis.call('ZADD', zkey('state:' .. to), seq, id)
  redis.call('HSET', jkey(id), 'state', to)
  return seq
end
local function insert(id, first)
  local seq = redis.call('INCR', zkey('seq'))
  local fields = {}
  for i = first, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', jkey(id), 'seq', seq, unpack(fields))
  redis.call('ZADD', zkey('jobs'), seq, id)
  redis.call('ZADD', zkey('tenant:' .. (redis.call('HGET', jkey(id), 'tenant') or 'anonymous')), seq, id)
  redis.call('ZADD', zkey('state:queued'), seq, id)
  redis.call('ZADD', zkey('queued'), seq, id)
end
-- running -> queued at its old place; the caller decides about attempts
local function requeue(id)
  local seq = move(id, 'running', 'queued')
  redis.call('HDEL', jkey(id), 'owner', 'started_at', 'lease_until', 'phase')
  redis.call('ZREM', zkey('leases'), id)
  redis.call('ZADD', zkey('queued'), seq, id)
end
-- queued/running -> succeeded/failed/cancelled; a job with a callback URL now has a webhook to deliver
local function terminate(id, from, to, now_s)
  local k = jkey(id)
  move(id, from, to)
  redis.call('HSET', k, 'finished_at', now_s)
  redis.call('HDEL', k, 'lease_until', 'webhook_owner', 'webhook_lease_until', 'phase')
  redis.call('ZREM', zkey('queued'), id)
  redis.call('ZREM', zkey('leases'), id)
  redis.call('ZREM', zkey('webhooks:claimed'), id)
  redis.call('ZADD', zkey('finished'), now_s, id)
  if to ~= 'cancelled' then redis.call('ZADD', zkey('completions'), now_s, id) end
  if redis.call('HEXISTS', k, 'callback_url') == 1 then
    redis.call('HSET', k, 'webhook_state', 'pending')
    redis.call('ZADD', zkey('webhooks:due'), now_s, id)
  end
end
