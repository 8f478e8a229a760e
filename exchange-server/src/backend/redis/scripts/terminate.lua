-- Terminates a mailbox for a caller; answers {'missing'}, {'denied', owner},
-- {'terminated'} (it was already), or {'active'} and, when messages were
-- queued, 'drain': its queue became the drain stream, which the exchange
-- reads a page at a time to answer the requests left in it, then deletes.
-- A drain left by a crash expires. What the mailbox held is given back
-- (release.lua).
-- KEYS[1..5]  as release.lua: mailbox hash, queue, sizes, per-owner and
--             per-sender usage hashes
-- KEYS[6]     its drain stream
-- KEYS[7..]   for an agent, the discovery index sets that list it
-- ARGV        id, gravestone TTL in seconds (0: forever), notice channel
--             prefix, caller (empty: trusted), drain TTL in seconds
-- Owner check, as in subscribe.lua and acknowledge.lua: a mailbox with an
-- owner ('o') refuses a caller with another principal.
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {'missing'} end
local o = redis.call('HGET', KEYS[1], 'o')
if o and ARGV[4] ~= '' and o ~= ARGV[4] then return {'denied', o} end
if s == 't' then return {'terminated'} end
release()
redis.call('HSET', KEYS[1], 's', 't')
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
local out = {'active'}
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[6])
  redis.call('EXPIRE', KEYS[6], ARGV[5])
  out[2] = 'drain'
end
local r = redis.call('HGET', KEYS[1], 'r')
if r then redis.call('PUBLISH', ARGV[3] .. r, 't ' .. ARGV[1] .. '\n') end
for i = 7, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return out
