-- Writes one mailbox's state only if its version is still the one the
-- caller read. It contains no policy rule, because the caller computed the
-- new state.
-- KEYS[1]  the mailbox hash
-- ARGV[1]  version read ("0" when the hash did not exist)
-- ARGV[2]  new state (JSON)
-- ARGV[3]  work queued with the state (JSON), or "" for none
-- ARGV[4]  "1" to keep the hash, "0" to let it expire after ARGV[5] ms
-- Returns the new version, or -1 when the version changed meanwhile.
local current = redis.call('HGET', KEYS[1], 'version')
if not current then
  current = '0'
end
if current ~= ARGV[1] then
  return -1
end
local version = tonumber(current) + 1
redis.call('HSET', KEYS[1], 'version', version, 'state', ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'pending')
else
  redis.call('HSET', KEYS[1], 'pending', ARGV[3])
end
if ARGV[4] == '1' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return version
