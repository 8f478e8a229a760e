-- Appends messages to mailboxes, in order; one answer per message: 'ok',
-- 'missing', 'terminated', 'full' (messages), 'fullbytes' (bytes), 'quota'
-- (the sender's bytes queued), or about its source (with a sender): 'nosrc'
-- (no such mailbox) or 'denied:<owner>'.
-- KEYS        the (mailbox hash, queue stream, sizes hash) triples written
--             to; the depth per behaviour; with a sender, the hash of
--             bytes queued per sender, then the hashes of the mailboxes the
--             messages come from
-- ARGV        queue bound in messages, in bytes (0: none), largest
--             message sent inside a notice, notice channel prefix, number
--             of triples, sender (empty: trusted), the
--             sender's quota of bytes queued (0: none), the calling
--             replica, the triples' mailbox ids, then per message: its
--             triple's number (from 1), with a sender its source's number
--             (from 1; 0: a source that did not parse), the message
-- A message's size (and sender) is kept in the sizes hash until it is
-- acknowledged, so the bounds can be given back. Each mailbox with a
-- subscriber gets notices on its replica's channel, one publish per replica
-- for the whole call: `m <id> <previous> <added> <size>\n` followed by the
-- message, or `n <id> <previous> <added> 0\n` for a large one; but a small
-- message whose subscriber is on the calling replica is answered
-- {'ok', previous, added} instead of noticed, as the caller hands it over
-- itself. A mailbox's hash is read and written once per call.
local function enqueue(KEYS, ARGV)
  local max, maxbytes, small, bell, n, sender, quota, me = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8]
  local first = 8
  local boxes, notices, refused = {}, {}, {[0] = 'nosrc'}
  for k = 1, n do
    local h = redis.call('HMGET', KEYS[3 * k - 2], 's', 'l', 'r', 'qb', 'b')
    local m = {id = ARGV[first + k], state = h[1], last = h[2] or '0-0', replica = h[3], bytes = tonumber(h[4] or '0'), added = 0, count = 0, behaviour = h[5] or ''}
    if h[1] == 'a' and max > 0 then m.len = redis.call('XLEN', KEYS[3 * k - 1]) end
    boxes[k] = m
  end
  local held, sent, usage = 0, 0, nil
  if sender ~= '' then
    usage = KEYS[3 * n + 2]
    held = tonumber(redis.call('HGET', usage, sender) or '0')
    for j = 1, #KEYS - 3 * n - 2 do
      local h = redis.call('HMGET', KEYS[3 * n + 2 + j], 's', 'o')
      if not h[1] then refused[j] = 'nosrc'
      elseif h[2] and h[2] ~= sender then refused[j] = 'denied:' .. h[2] end
    end
  end
  local out = {}
  local step = sender == '' and 2 or 3
  for i = first + 1 + n, #ARGV, step do
    local k, data = tonumber(ARGV[i]), ARGV[i + step - 1]
    local m = boxes[k]
    local no = step == 3 and refused[tonumber(ARGV[i + 1])]
    if no then out[#out + 1] = no
    elseif not m.state then out[#out + 1] = 'missing'
    elseif m.state == 't' then out[#out + 1] = 'terminated'
    elseif m.len and m.len >= max then out[#out + 1] = 'full'
    elseif maxbytes > 0 and m.bytes + #data > maxbytes then out[#out + 1] = 'fullbytes'
    elseif quota > 0 and held + sent + #data > quota then out[#out + 1] = 'quota'
    else
      local added = redis.call('XADD', KEYS[3 * k - 1], '*', 'm', data)
      redis.call('HSET', KEYS[3 * k], added, sender == '' and tostring(#data) or (#data .. ' ' .. sender))
      if m.len then m.len = m.len + 1 end
      m.bytes, m.added, m.count = m.bytes + #data, m.added + #data, m.count + 1
      if sender ~= '' then sent = sent + #data end
      local answer = 'ok'
      if m.replica == me and #data <= small then
        answer = {'ok', m.last, added}
      elseif m.replica then
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
      m.last, m.fresh = added, true
      out[#out + 1] = answer
    end
  end
  for k, m in ipairs(boxes) do
    if m.fresh then
      -- qb was read above: its new value is written with l, in one call.
      redis.call('HSET', KEYS[3 * k - 2], 'l', m.last, 'qb', string.format('%d', m.bytes))
      redis.call('HINCRBY', KEYS[3 * n + 1], 'm:' .. m.behaviour, m.count)
      redis.call('HINCRBY', KEYS[3 * n + 1], 'b:' .. m.behaviour, m.added)
    end
  end
  if sent > 0 then redis.call('HINCRBY', usage, sender, sent) end
  for replica, parts in pairs(notices) do redis.call('PUBLISH', bell .. replica, table.concat(parts)) end
  return out
end
