-- Deletes acknowledged messages and gives back what they held against the
-- mailbox's bounds and their senders' quotas; answers 'ok', 'missing',
-- 'terminated', 'denied:<owner>', or 'never:<id>' when an id is past the
-- last message added. The exchange sends at most a thousand ids per call.
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its queue stream
-- KEYS[3]     its sizes hash
-- KEYS[4]     the hash of bytes queued per sender
-- KEYS[5]     the depth per behaviour
-- ARGV        caller (empty: trusted), the highest stream id acknowledged,
--             then every stream id
local function acknowledge(KEYS, ARGV)
  local h = redis.call('HMGET', KEYS[1], 's', 'o', 'l', 'b')
  local s, o = h[1], h[2]
  if not s then return 'missing' end
  if o and ARGV[1] ~= '' and o ~= ARGV[1] then return 'denied:' .. o end
  if s == 't' then return 'terminated' end
  if #ARGV < 3 then return 'ok' end
  local lms, lseq = string.match(h[3] or '0-0', '(%d+)-(%d+)')
  local ms, seq = string.match(ARGV[2], '(%d+)-(%d+)')
  ms, seq, lms, lseq = tonumber(ms), tonumber(seq), tonumber(lms), tonumber(lseq)
  if ms > lms or (ms == lms and seq > lseq) then return 'never:' .. ARGV[2] end
  local sizes = redis.call('HMGET', KEYS[3], unpack(ARGV, 3))
  local freed, count, senders = 0, 0, {}
  for i, size in ipairs(sizes) do
    if size then
      local bytes, sender = string.match(size, '^(%d+) ?(.*)$')
      bytes = tonumber(bytes)
      freed, count = freed + bytes, count + 1
      if sender ~= '' then senders[sender] = (senders[sender] or 0) + bytes end
    end
  end
  redis.call('XDEL', KEYS[2], unpack(ARGV, 3))
  redis.call('HDEL', KEYS[3], unpack(ARGV, 3))
  if freed > 0 then redis.call('HINCRBY', KEYS[1], 'qb', -freed) end
  if count > 0 then
    redis.call('HINCRBY', KEYS[5], 'm:' .. (h[4] or ''), -count)
    redis.call('HINCRBY', KEYS[5], 'b:' .. (h[4] or ''), -freed)
  end
  for sender, bytes in pairs(senders) do redis.call('HINCRBY', KEYS[4], sender, -bytes) end
  return 'ok'
end
