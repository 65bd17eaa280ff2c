-- Takes or renews a lease held under KEYS[1] by the host ARGV[1] for
-- ARGV[2] ms. Returns 1 when the caller holds the lease, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
