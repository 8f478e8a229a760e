-- Commits what an agent did with some requests, all or nothing: checks the
-- save (save_state.lua), acknowledges the requests (acknowledge.lua), saves
-- the state, and queues the answers (enqueue.lua). Answers what
-- save_state.lua refuses with, {'never', stream id} for a request never
-- delivered, or {'ok', revision, {one enqueue answer per answer}}.
-- KEYS        save_state.lua's 2 keys, acknowledge.lua's 5, then, with
--             answers, enqueue.lua's
-- ARGV        the number of save_state.lua's arguments, of
--             acknowledge.lua's, then their arguments, then, with answers,
--             enqueue.lua's
local function slice(t, from, to)
  local out = {}
  for i = from, to do out[#out + 1] = t[i] end
  return out
end
local ns, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local skeys, sargv = slice(KEYS, 1, 2), slice(ARGV, 3, 2 + ns)
local refused = save_state(skeys, sargv, true)
if refused[1] ~= 'ok' then return refused end
local acked = acknowledge(slice(KEYS, 3, 7), slice(ARGV, 3 + ns, 2 + ns + na))
if acked ~= 'ok' then
  local head, rest = string.match(acked, '^(%a+):?(.*)$')
  return {head, rest}
end
local saved = save_state(skeys, sargv, false)
local results = {}
if #KEYS > 7 then results = enqueue(slice(KEYS, 8, #KEYS), slice(ARGV, 3 + ns + na, #ARGV)) end
return {'ok', saved[2], results}
