-- ARGV: prefix
local seen, owners = {}, {}
for _, id in ipairs(redis.call('ZRANGE', zkey('leases'), 0, -1)) do
  local owner = redis.call('HGET', jkey(id), 'owner')
  if owner and not seen[owner] then
    seen[owner] = true
    owners[#owners + 1] = owner
  end
end
return owners
