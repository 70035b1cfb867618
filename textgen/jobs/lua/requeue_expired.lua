-- ARGV: prefix, max_attempts, abandoned error, died-in-phase error prefix, suffix
local now, now_s = clock()
local requeued, failed = 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', zkey('leases'), '-inf', '(' .. now_s)) do
  local phase = redis.call('HGET', jkey(id), 'phase')
  if phase then
    -- its process died while it was marked (set_phase): failed at once, not retried
    redis.call('HSET', jkey(id), 'error', ARGV[4] .. phase .. ARGV[5])
    terminate(id, 'running', 'failed', now_s)
    failed = failed + 1
  elseif tonumber(redis.call('HGET', jkey(id), 'attempts') or '0') >= tonumber(ARGV[2]) then
    redis.call('HSET', jkey(id), 'error', ARGV[3])
    terminate(id, 'running', 'failed', now_s)
    failed = failed + 1
  else
    requeue(id)
    requeued = requeued + 1
  end
end
return {requeued, failed}
