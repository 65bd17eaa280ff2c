-- Removes member ARGV[1] from the sorted set KEYS[1] only while its score
-- is still ARGV[2], so an entry a writer renewed meanwhile stays.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
