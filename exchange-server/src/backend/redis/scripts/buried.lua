-- Answers 1 if agent id ARGV[1] (16 bytes) has a gravestone, else 0.
-- KEYS        the gravestone strings it would be in (gravestones.lua)
return buried(1, #KEYS, ARGV[1]) and 1 or 0
