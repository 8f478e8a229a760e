-- Deletes a transient client mailbox (Invoke's) without a gravestone, giving
-- back what it held (release.lua). Answers 'ok'.
-- KEYS[1..7]  as release.lua: mailbox hash, queue, sizes, per-owner and
--             per-sender usage hashes, depth per behaviour, saved state
-- KEYS[8]     the sorted set of idle client mailboxes
-- ARGV        id
if redis.call('HGET', KEYS[1], 's') == 'a' then release() end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[8], ARGV[1])
return 'ok'
