-- Terminates a mailbox for a caller: deletes it and, for an agent, appends
-- its id to a gravestone string. Answers {'missing'} (no mailbox: the
-- exchange looks for a gravestone), {'denied', owner}, {'terminated'} (a
-- schema-2 gravestone), or {'active'} and, when messages were queued,
-- 'drain': its queue became the drain stream, which the exchange reads a
-- page at a time to answer the requests left in it, then deletes. A drain
-- left by a crash expires. What the mailbox held is given back
-- (release.lua).
-- KEYS[1..7]  as release.lua: mailbox hash, queue, sizes, per-owner and
--             per-sender usage hashes, depth per behaviour, saved state
-- KEYS[8]     its drain stream
-- KEYS[9]     the sorted set of idle client mailboxes
-- KEYS[10]    the gravestone string of now for its id
-- KEYS[11..]  for an agent, the discovery index sets that list it
-- ARGV        id, gravestone string TTL in seconds (0: forever), notice
--             channel prefix, caller (empty: trusted), drain TTL in
--             seconds, the id's 16 bytes
-- Owner check, as in subscribe.lua and acknowledge.lua: a mailbox with an
-- owner ('o') refuses a caller with another principal.
local h = redis.call('HMGET', KEYS[1], 's', 'o', 'k', 'r')
local s, o = h[1], h[2]
if not s then return {'missing'} end
if o and ARGV[4] ~= '' and o ~= ARGV[4] then return {'denied', o} end
if s == 't' then return {'terminated'} end
release()
local out = {'active'}
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[8])
  redis.call('EXPIRE', KEYS[8], ARGV[5])
  out[2] = 'drain'
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[9], ARGV[1])
if h[3] == 'a' then
  local ttl = tonumber(ARGV[2])
  if redis.call('APPEND', KEYS[10], ARGV[6]) == 16 and ttl > 0 then
    redis.call('EXPIRE', KEYS[10], ttl)
  end
end
if h[4] then redis.call('PUBLISH', ARGV[3] .. h[4], 't ' .. ARGV[1] .. '\n') end
for i = 11, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return out
