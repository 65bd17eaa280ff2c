-- Reads the device table's version and every status in one step, so the
-- statuses are those of that version.
-- KEYS[1]  the table's version (string)
-- KEYS[2]  the statuses (hash: device id -> status JSON)
-- Returns {version, id1, status1, id2, status2, ...}.
local version = redis.call('GET', KEYS[1])
if not version then
  version = '0'
end
local reply = redis.call('HGETALL', KEYS[2])
table.insert(reply, 1, version)
return reply
