-- Forgets a replica as the one with the mailbox's subscriber, as its
-- subscription of a generation ended, unless a newer one took over; a
-- client's mailbox is idle from now.
-- KEYS[1]     the mailbox hash
-- KEYS[2]     the sorted set of idle client mailboxes
-- ARGV        generation, replica, id
local h = redis.call('HMGET', KEYS[1], 'g', 'r', 'k')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  redis.call('HDEL', KEYS[1], 'r', 'p')
  if h[3] == 'c' then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[2], 'XX', t[1] * 1000 + math.floor(t[2] / 1000), ARGV[3])
  end
end
return 'ok'
