-- Appends messages to mailboxes, in order; one answer per message: 'ok',
-- 'missing', 'terminated', 'full', or about its source (with a sender):
-- 'nosrc' (no such mailbox) or 'denied:<owner>'.
-- KEYS        the (mailbox hash, queue stream) pairs written to, then (with a
--             sender) the hashes of the mailboxes the messages come from
-- ARGV        queue bound (0: none), TTL in seconds (0: none), largest message
--             sent inside a notice, notice channel prefix, number of pairs,
--             sender (empty: trusted), the pairs' mailbox ids, then per
--             message: its pair's number (from 1), with a sender its source's
--             number (from 1; 0: a source that did not parse), the message
-- Each mailbox with a subscriber gets notices on its replica's channel, one
-- publish per replica for the whole call: `m <id> <previous> <added> <size>\n`
-- followed by the message, or `n <id> <previous> <added> 0\n` for a large
-- one. A mailbox's hash is read and written once per call.
local max, ttl, small, bell, n, sender = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6]
local boxes, notices, refused = {}, {}, {[0] = 'nosrc'}
for k = 1, n do
  local mb, q = KEYS[2 * k - 1], KEYS[2 * k]
  local h = redis.call('HMGET', mb, 's', 'l', 'r')
  local m = {id = ARGV[6 + k], state = h[1], last = h[2] or '0-0', replica = h[3]}
  if h[1] == 'a' and max > 0 then m.len = redis.call('XLEN', q) end
  boxes[k] = m
end
for j = 1, #KEYS - 2 * n do
  local h = redis.call('HMGET', KEYS[2 * n + j], 's', 'o')
  if not h[1] then refused[j] = 'nosrc'
  elseif h[2] and h[2] ~= sender then refused[j] = 'denied:' .. h[2] end
end
local out = {}
local step = sender == '' and 2 or 3
for i = 7 + n, #ARGV, step do
  local k, data = tonumber(ARGV[i]), ARGV[i + step - 1]
  local m = boxes[k]
  local no = step == 3 and refused[tonumber(ARGV[i + 1])]
  if no then out[#out + 1] = no
  elseif not m.state then out[#out + 1] = 'missing'
  elseif m.state == 't' then out[#out + 1] = 'terminated'
  elseif m.len and m.len >= max then out[#out + 1] = 'full'
  else
    local added = redis.call('XADD', KEYS[2 * k], '*', 'm', data)
    if m.len then m.len = m.len + 1 end
    if m.replica then
      local parts = notices[m.replica] or {}
      notices[m.replica] = parts
      local head = m.id .. ' ' .. m.last .. ' ' .. added
      if #data <= small then
        parts[#parts + 1] = 'm ' .. head .. ' ' .. #data .. '\n'
        parts[#parts + 1] = data
      else
        parts[#parts + 1] = 'n ' .. head .. ' 0\n'
      end
    end
    m.last, m.added = added, true
    out[#out + 1] = 'ok'
  end
end
for k, m in ipairs(boxes) do
  if m.added then
    redis.call('HSET', KEYS[2 * k - 1], 'l', m.last)
    if ttl > 0 then redis.call('EXPIRE', KEYS[2 * k - 1], ttl); redis.call('EXPIRE', KEYS[2 * k], ttl) end
  end
end
for replica, parts in pairs(notices) do redis.call('PUBLISH', bell .. replica, table.concat(parts)) end
return out
