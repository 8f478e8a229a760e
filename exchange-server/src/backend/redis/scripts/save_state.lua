-- Saves an agent's state for one incarnation; answers {'ok', revision},
-- {'missing'}, {'terminated'}, {'denied', owner}, {'stale', current epoch}
-- or {'conflict', current revision}. A save by a later incarnation also
-- raises the mailbox's epoch, fencing the earlier ones off it. `check`
-- only checks (answering the current revision); without data it raises
-- the epoch and keeps the state.
-- KEYS[1]     the mailbox hash
-- KEYS[2]     its state hash (`d` data, `ct` content type, `v` version,
--             `rev` revision, `e` epoch, `at` ms since the epoch)
-- ARGV        caller (empty: trusted), epoch, expected revision (0: any),
--             then, to save data: data, content type, version
local function save_state(KEYS, ARGV, check)
  local h = redis.call('HMGET', KEYS[1], 's', 'o', 'e')
  if not h[1] then return {'missing'} end
  if h[2] and ARGV[1] ~= '' and h[2] ~= ARGV[1] then return {'denied', h[2]} end
  if h[1] == 't' then return {'terminated'} end
  local st = redis.call('HMGET', KEYS[2], 'rev', 'e')
  local rev, saved = tonumber(st[1] or '0'), tonumber(st[2] or '0')
  local epoch, subscribed = tonumber(ARGV[2]), tonumber(h[3] or '0')
  local current = math.max(subscribed, saved)
  if epoch < current then return {'stale', tostring(current)} end
  local expected = tonumber(ARGV[3])
  if expected > 0 and expected ~= rev then return {'conflict', tostring(rev)} end
  if check then return {'ok', tostring(rev)} end
  if epoch > subscribed then redis.call('HSET', KEYS[1], 'e', ARGV[2]) end
  if not ARGV[4] then return {'ok', tostring(rev)} end
  local t = redis.call('TIME')
  local at = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('HSET', KEYS[2], 'd', ARGV[4], 'ct', ARGV[5], 'v', ARGV[6], 'rev', rev + 1, 'e', ARGV[2], 'at', at)
  return {'ok', tostring(rev + 1)}
end
