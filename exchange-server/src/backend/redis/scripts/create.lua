-- Creates a mailbox; answers 'ok', 'quota' (its owner owns as many active
-- mailboxes as it may), or the state of the mailbox that exists already
-- ('a' active, 't' terminated).
-- KEYS[1]     the mailbox hash
-- KEYS[2]     the hash of active mailboxes per owner
-- KEYS[3..]   for an agent, the discovery index sets that list it
-- ARGV        id, kind ('a' agent, 'c' client), behaviour, implements (JSON),
--             name, TTL in seconds (0: none), owner (empty: none), the
--             owner's quota of active mailboxes (0: none)
local s = redis.call('HGET', KEYS[1], 's')
if s then return s end
local owner, quota = ARGV[7], tonumber(ARGV[8])
if owner ~= '' then
  local held = tonumber(redis.call('HGET', KEYS[2], owner) or '0')
  if quota > 0 and held >= quota then return 'quota' end
  redis.call('HINCRBY', KEYS[2], owner, 1)
end
redis.call('HSET', KEYS[1], 's', 'a', 'k', ARGV[2], 'b', ARGV[3], 'i', ARGV[4], 'n', ARGV[5], 'g', 0, 'qb', 0)
if owner ~= '' then redis.call('HSET', KEYS[1], 'o', owner) end
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
for i = 3, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
return 'ok'
