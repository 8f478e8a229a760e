-- Makes a blob whose chunks are all kept readable, with its digest: 1, or
-- 0 when it is gone.
-- KEYS[1]     the blob's hash
-- ARGV        its SHA-256
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'h', ARGV[1])
return 1
