-- ARGV: prefix, id, key, fingerprint, ttl_s, expire_ms, field, value, ...
local id, ik = ARGV[2], zkey('idem:' .. ARGV[3])
local now, now_s = clock()
local rec = redis.call('HMGET', ik, 'fingerprint', 'job_id', 'created_at')
-- a record older than the TTL, or whose job was purged, is as good as absent
if rec[1] and tonumber(rec[3]) >= now - tonumber(ARGV[5]) and redis.call('EXISTS', jkey(rec[2])) == 1 then
  if rec[1] ~= ARGV[4] then return {'conflict'} end
  return {'existing', redis.call('HGETALL', jkey(rec[2]))}
end
insert(id, 7)
redis.call('HSET', jkey(id), 'idem_key', ARGV[3])
redis.call('DEL', ik)
redis.call('HSET', ik, 'fingerprint', ARGV[4], 'job_id', id, 'created_at', now_s)
redis.call('PEXPIRE', ik, ARGV[6])
return {'created'}
