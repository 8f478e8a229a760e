-- Gives back what a mailbox that is going away held: its owner's count of
-- active mailboxes, and its queued messages' bytes against their senders'
-- quotas (its sizes hash, then deleted). Shared by terminate.lua and
-- forget.lua, which it opens (KEYS[1..5] as below).
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its queue stream
-- KEYS[3]     its sizes hash
-- KEYS[4]     the hash of active mailboxes per owner
-- KEYS[5]     the hash of bytes queued per sender
local function release()
  local o = redis.call('HGET', KEYS[1], 'o')
  if o then redis.call('HINCRBY', KEYS[4], o, -1) end
  local senders = {}
  for _, size in ipairs(redis.call('HVALS', KEYS[3])) do
    local bytes, sender = string.match(size, '^(%d+) ?(.*)$')
    if sender ~= '' then senders[sender] = (senders[sender] or 0) + tonumber(bytes) end
  end
  for sender, bytes in pairs(senders) do redis.call('HINCRBY', KEYS[5], sender, -bytes) end
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[1], 'qb', 0)
end
