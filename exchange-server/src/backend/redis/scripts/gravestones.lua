-- Whether agent id `id` (16 bytes) has a gravestone in one of the strings
-- KEYS[first..last] (each 16-byte ids end to end). Opens the scripts that
-- look for gravestones.
local function buried(first, last, id)
  for i = first, last do
    local stones = redis.call('GET', KEYS[i])
    if stones then
      local from = 1
      while true do
        local at = string.find(stones, id, from, true)
        if not at then break end
        if at % 16 == 1 then return true end
        from = at + 1
      end
    end
  end
  return false
end
