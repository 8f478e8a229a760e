-- Makes a replica the mailbox's subscriber's, for a caller; the previous
-- subscriber (on any replica) is told it was taken over. Answers
-- {'missing'}, {'denied', owner}, {'terminated'} or {'ok', generation}.
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its queue stream
-- ARGV        TTL in seconds (0: none), notice channel prefix, replica, id,
--             caller (empty: trusted)
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {'missing'} end
local o = redis.call('HGET', KEYS[1], 'o')
if o and ARGV[5] ~= '' and o ~= ARGV[5] then return {'denied', o} end
if s == 't' then return {'terminated'} end
local g = redis.call('HINCRBY', KEYS[1], 'g', 1)
local r = redis.call('HGET', KEYS[1], 'r')
if r then redis.call('PUBLISH', ARGV[2] .. r, 's ' .. ARGV[4] .. ' ' .. g .. '\n') end
redis.call('HSET', KEYS[1], 'r', ARGV[3])
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl); redis.call('EXPIRE', KEYS[2], ttl) end
return {'ok', g}
