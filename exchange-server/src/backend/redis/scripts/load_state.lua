-- An agent's saved state: {'ok', data, content type, version, revision,
-- epoch, ms since the epoch}, {'none'} when it saved none, or {'missing'},
-- {'terminated'}, {'denied', owner}.
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its state hash
-- ARGV        caller (empty: trusted)
local h = redis.call('HMGET', KEYS[1], 's', 'o')
if not h[1] then return {'missing'} end
if h[2] and ARGV[1] ~= '' and h[2] ~= ARGV[1] then return {'denied', h[2]} end
if h[1] == 't' then return {'terminated'} end
local st = redis.call('HMGET', KEYS[2], 'd', 'ct', 'v', 'rev', 'e', 'at')
if not st[4] then return {'none'} end
return {'ok', st[1], st[2], st[3], st[4], st[5], st[6]}
