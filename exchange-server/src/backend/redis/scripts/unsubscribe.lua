-- Forgets a replica as the one with the mailbox's subscriber, as its
-- subscription of a generation ended, unless a newer one took over.
-- KEYS[1]     the mailbox hash
-- ARGV        generation, replica
local h = redis.call('HMGET', KEYS[1], 'g', 'r')
if h[1] == ARGV[1] and h[2] == ARGV[2] then redis.call('HDEL', KEYS[1], 'r') end
return 'ok'
