-- Adds a delivery to the shared outbox once in its lifetime: a marker
-- remembers every delivery ever queued, so moving the same pending work
-- again after the delivery finished does not send it a second time.
-- KEYS[1]  the marker of this delivery
-- KEYS[2]  the items hash
-- KEYS[3]  the schedule (sorted set)
-- ARGV[1]  delivery id
-- ARGV[2]  item (JSON)
-- ARGV[3]  due time (ms)
-- ARGV[4]  marker lifetime (ms)
-- Returns 1 when the delivery was added, 0 when it was queued before.
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) == false then
  return 0
end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1])
return 1
