-- Gives back what a mailbox that is going away held: its owner's count of
-- active mailboxes, its queued messages' bytes against their senders'
-- quotas (its sizes hash, then deleted), and its messages and bytes in the
-- depth per behaviour; and it deletes an agent's saved state. Shared by
-- terminate.lua, forget.lua and abandon.lua, which it opens (KEYS[1..7] as
-- below).
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its queue stream
-- KEYS[3]     its sizes hash
-- KEYS[4]     the hash of active mailboxes per owner
-- KEYS[5]     the hash of bytes queued per sender
-- KEYS[6]     the depth per behaviour
-- KEYS[7]     its saved state
local function release()
  local h = redis.call('HMGET', KEYS[1], 'o', 'b')
  local o, b = h[1], h[2] or ''
  if o then redis.call('HINCRBY', KEYS[4], o, -1) end
  local senders, count, total = {}, 0, 0
  for _, size in ipairs(redis.call('HVALS', KEYS[3])) do
    local bytes, sender = string.match(size, '^(%d+) ?(.*)$')
    count, total = count + 1, total + tonumber(bytes)
    if sender ~= '' then senders[sender] = (senders[sender] or 0) + tonumber(bytes) end
  end
  for sender, bytes in pairs(senders) do redis.call('HINCRBY', KEYS[5], sender, -bytes) end
  if count > 0 then
    redis.call('HINCRBY', KEYS[6], 'm:' .. b, -count)
    redis.call('HINCRBY', KEYS[6], 'b:' .. b, -total)
  end
  redis.call('DEL', KEYS[3], KEYS[7])
  redis.call('HSET', KEYS[1], 'qb', 0)
end
