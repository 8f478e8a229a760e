-- Deletes a transient client mailbox (Invoke's) without a gravestone, giving
-- back what it held (release.lua). Answers 'ok'.
-- KEYS[1..5]  as release.lua: mailbox hash, queue, sizes, per-owner and
--             per-sender usage hashes
if redis.call('HGET', KEYS[1], 's') == 'a' then release() end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 'ok'
