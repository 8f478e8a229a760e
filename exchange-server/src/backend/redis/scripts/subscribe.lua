-- Makes a replica the mailbox's subscriber's, for a caller; the previous
-- subscriber (on any replica) is told it was taken over. With an epoch (an
-- agent's incarnation, not 0), refuses one below the highest that
-- subscribed. Answers {'missing'}, {'denied', owner}, {'terminated'},
-- {'stale', current epoch} or {'ok', generation}.
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its queue stream
-- KEYS[3]     its sizes hash
-- ARGV        notice channel prefix, replica, id, caller (empty: trusted),
--             epoch (0: none), peer endpoint (empty: none)
local h = redis.call('HMGET', KEYS[1], 's', 'o', 'e')
local s, o = h[1], h[2]
if not s then return {'missing'} end
if o and ARGV[4] ~= '' and o ~= ARGV[4] then return {'denied', o} end
if s == 't' then return {'terminated'} end
local epoch = tonumber(ARGV[5])
if epoch > 0 then
  local current = tonumber(h[3] or '0')
  if epoch < current then return {'stale', current} end
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local g = redis.call('HINCRBY', KEYS[1], 'g', 1)
local r = redis.call('HGET', KEYS[1], 'r')
if r then redis.call('PUBLISH', ARGV[1] .. r, 's ' .. ARGV[3] .. ' ' .. g .. '\n') end
redis.call('HSET', KEYS[1], 'r', ARGV[2])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'p', ARGV[6])
else
  redis.call('HDEL', KEYS[1], 'p')
end
return {'ok', g}
