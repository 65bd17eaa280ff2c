-- Writes device statuses only if the device table's version is still the
-- one the caller read, together with the work (events, deliveries,
-- notices) that goes with them. It contains no device rule, because the
-- caller computed the new statuses.
-- KEYS[1]  the table's version (string)
-- KEYS[2]  the statuses (hash: device id -> status JSON)
-- KEYS[3]  the pending work (hash: work id -> JSON)
-- ARGV[1]  version read ("0" when the table did not exist)
-- ARGV[2]  work id, or "" for none
-- ARGV[3]  work (JSON)
-- ARGV[4], ARGV[5], ...  device id and status JSON pairs
-- Returns the new version, or -1 when the version changed meanwhile.
local current = redis.call('GET', KEYS[1])
if not current then
  current = '0'
end
if current ~= ARGV[1] then
  return -1
end
local version = redis.call('INCR', KEYS[1])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
end
return version
