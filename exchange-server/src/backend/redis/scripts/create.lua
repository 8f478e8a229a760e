-- Creates a mailbox; answers 'ok', 'quota' (its owner owns as many active
-- mailboxes as it may), 'a' (an active mailbox has the id) or 't' (an agent
-- with the id was terminated: its gravestone is there).
-- KEYS[1]     the mailbox hash
-- KEYS[2]     the hash of active mailboxes per owner
-- KEYS[3]     the sorted set of idle client mailboxes
-- KEYS[4..]   for an agent, the gravestone strings its id would be in
--             (ARGV[8] of them), then the discovery index sets that list it
-- ARGV        id, kind ('a' agent, 'c' client), behaviour, implements (JSON),
--             name, owner (empty: none), the owner's quota of active
--             mailboxes (0: none), number of gravestone keys, the id's 16
--             bytes, the agent's description (protobuf; empty: none)
local s = redis.call('HGET', KEYS[1], 's')
if s then return s end
local stones = 3 + tonumber(ARGV[8])
if ARGV[2] == 'a' and buried(4, stones, ARGV[9]) then return 't' end
local owner, quota = ARGV[6], tonumber(ARGV[7])
if owner ~= '' then
  local held = tonumber(redis.call('HGET', KEYS[2], owner) or '0')
  if quota > 0 and held >= quota then return 'quota' end
  redis.call('HINCRBY', KEYS[2], owner, 1)
end
redis.call('HSET', KEYS[1], 's', 'a', 'k', ARGV[2], 'b', ARGV[3], 'i', ARGV[4], 'n', ARGV[5], 'g', 0, 'qb', 0)
if owner ~= '' then redis.call('HSET', KEYS[1], 'o', owner) end
if ARGV[10] and ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'x', ARGV[10]) end
if ARGV[2] == 'c' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
end
for i = stones + 1, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
return 'ok'
