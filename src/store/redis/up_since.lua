-- Keeps the time since which some host has run without a gap longer than
-- the key's lifetime. The first host to start after every host stopped
-- sets it; each running host renews its lifetime.
-- KEYS[1]  the start time (string, milliseconds)
-- ARGV[1]  the caller's time, stored when the key is absent
-- ARGV[2]  the key's lifetime in milliseconds
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('GET', KEYS[1])
