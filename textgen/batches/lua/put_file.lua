-- A file's record, its indexes, its owner's usage (files, bytes) and the expiry index, in one step; a
-- replaced record (a finalisation run again) first gives back what it counted. With check = 1 nothing is
-- written if the owner's usage with the file would pass max_files or max_bytes (0 = no limit).
-- KEYS: file, all files, owner's files, owner's usage, expiry. ARGV: prefix, id, owner, json, bytes,
-- created_at, expires_at ('' = never), check (0/1), max_files, max_bytes
local P, id, owner, size = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])
local old = redis.call('GET', KEYS[1])
local old_owner, old_bytes = nil, 0
if old then
  local record = cjson.decode(old)
  old_owner, old_bytes = record['owner'], math.floor(tonumber(record['bytes']) or 0)
end
if ARGV[8] == '1' then
  local files = tonumber(redis.call('HGET', KEYS[4], 'files') or '0')
  local used = tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0')
  if old_owner == owner then files, used = files - 1, used - old_bytes end
  local max_files, max_bytes = tonumber(ARGV[9]), tonumber(ARGV[10])
  if (max_files > 0 and files + 1 > max_files) or (max_bytes > 0 and used + size > max_bytes) then return 0 end
end
if old_owner then
  redis.call('HINCRBY', P .. ':bfusage:' .. old_owner, 'files', -1)
  redis.call('HINCRBY', P .. ':bfusage:' .. old_owner, 'bytes', -old_bytes)
  redis.call('ZREM', P .. ':bfiles:' .. old_owner, id)
end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[6], id)
redis.call('ZADD', KEYS[3], ARGV[6], id)
redis.call('HINCRBY', KEYS[4], 'files', 1)
redis.call('HINCRBY', KEYS[4], 'bytes', size)
if ARGV[7] == '' then redis.call('ZREM', KEYS[5], id) else redis.call('ZADD', KEYS[5], ARGV[7], id) end
return 1
