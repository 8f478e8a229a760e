-- Creates a mailbox; answers 'ok', or the state of the mailbox that exists
-- already ('a' active, 't' terminated).
-- KEYS[1]     the mailbox hash
-- KEYS[2..]   for an agent, the discovery index sets that list it
-- ARGV        id, kind ('a' agent, 'c' client), behaviour, implements (JSON),
--             name, TTL in seconds (0: none), owner (empty: none)
local s = redis.call('HGET', KEYS[1], 's')
if s then return s end
redis.call('HSET', KEYS[1], 's', 'a', 'k', ARGV[2], 'b', ARGV[3], 'i', ARGV[4], 'n', ARGV[5], 'g', 0)
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'o', ARGV[7]) end
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
return 'ok'
