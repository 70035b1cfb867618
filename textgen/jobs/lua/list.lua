-- ARGV: prefix, index name, limit (> 0). One script, so no job is seen in a state it already left.
local jobs = {}
for _, id in ipairs(redis.call('ZREVRANGE', zkey(ARGV[2]), 0, tonumber(ARGV[3]) - 1)) do
  jobs[#jobs + 1] = redis.call('HGETALL', jkey(id))
end
return jobs
