-- Deletes acknowledged messages; answers 'ok', 'missing', 'terminated',
-- 'denied:<owner>', or 'never:<id>' when an id is past the last message added.
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its queue stream
-- ARGV        caller (empty: trusted), the highest stream id acknowledged,
--             then every stream id (deleted a thousand at a time: Lua's
--             `unpack` is bounded)
local h = redis.call('HMGET', KEYS[1], 's', 'o', 'l')
local s, o = h[1], h[2]
if not s then return 'missing' end
if o and ARGV[1] ~= '' and o ~= ARGV[1] then return 'denied:' .. o end
if s == 't' then return 'terminated' end
if #ARGV < 3 then return 'ok' end
local lms, lseq = string.match(h[3] or '0-0', '(%d+)-(%d+)')
local ms, seq = string.match(ARGV[2], '(%d+)-(%d+)')
ms, seq, lms, lseq = tonumber(ms), tonumber(seq), tonumber(lms), tonumber(lseq)
if ms > lms or (ms == lms and seq > lseq) then return 'never:' .. ARGV[2] end
for i = 3, #ARGV, 1000 do redis.call('XDEL', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
return 'ok'
