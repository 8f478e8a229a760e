-- Moves one agent from the discovery index of schema 1 (sets) to the one of
-- schema 2 (sorted sets, all scores 0, so ordered by id): takes it out of the
-- old sets (which Redis deletes once empty) and, if its mailbox is still
-- active, adds it to the new ones. Answers 'ok'.
-- KEYS[1]               the agent's mailbox hash
-- KEYS[2..1+ARGV[2]]    the schema-1 sets that list it
-- KEYS[2+ARGV[2]..]     the schema-2 sorted sets that must list it
-- ARGV                  id, number of schema-1 sets
local old = tonumber(ARGV[2])
for i = 2, 1 + old do redis.call('SREM', KEYS[i], ARGV[1]) end
if redis.call('HGET', KEYS[1], 's') == 'a' then
  for i = 2 + old, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
end
return 'ok'
