-- Deletes a client mailbox without a subscriber since before the cutoff,
-- giving back what it held (release.lua); one whose subscriber is on a
-- replica that still runs is looked at again a retention later. Answers
-- 'expired', 'kept' or 'gone' (it was not there any more).
-- KEYS[1..7]  as release.lua: mailbox hash, queue, sizes, per-owner and
--             per-sender usage hashes, depth per behaviour, saved state
-- KEYS[8]     the sorted set of idle client mailboxes
-- KEYS[9]     the presence key of the replica the exchange saw subscribed
--             (any key when none)
-- ARGV        id, retention in ms, that replica (empty: none)
local idle = redis.call('ZSCORE', KEYS[8], ARGV[1])
if not idle then return 'gone' end
local h = redis.call('HMGET', KEYS[1], 's', 'r')
if not h[1] then
  redis.call('ZREM', KEYS[8], ARGV[1])
  return 'gone'
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if tonumber(idle) > now - tonumber(ARGV[2]) then return 'kept' end
if h[2] then
  -- Subscribed on a replica other than the one seen: look next time.
  if h[2] ~= ARGV[3] then return 'kept' end
  if redis.call('EXISTS', KEYS[9]) == 1 then
    redis.call('ZADD', KEYS[8], now, ARGV[1])
    return 'kept'
  end
end
release()
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[8], ARGV[1])
return 'expired'
