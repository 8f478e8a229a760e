-- Keeps one chunk of a blob being put, expiring with it: 1, or 0 when the
-- blob is gone (expired, freed).
-- KEYS[1]     the blob's hash
-- KEYS[2]     the chunk's key
-- ARGV        the chunk's bytes
local expires = redis.call('HGET', KEYS[1], 'x')
if not expires then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PXAT', expires)
return 1
