#!lua name=orders_gateway_v2
-- Server-side steps of orders-gateway, installed by every replica at start
-- (FUNCTION LOAD REPLACE) and again whenever Redis answers "function not
-- found" (a restarted Redis without persistence).
--
-- Versioned: the library is orders_gateway_v<N> and every function is
-- registered as <name>_v<N> (N = LIBRARY_VERSION in src/broker/redis.rs;
-- bump both on any change of semantics, arguments or keys). During a
-- rolling deploy old and new replicas each load and call their own
-- version side by side: a new replica never replaces a function an old one
-- calls, and an old replica's LOAD REPLACE never overwrites the new code.
local VERSION = '_v2'
--
-- Keys (not declared: single-node Redis, not Redis Cluster):
--   og:config                  history_max_events, history_max_age_ms, dedup_ttl_ms
--   og:meta:<rid>              epoch, seq              (event numbering)
--   og:hist:<rid>              zset seq -> "<ms>|<frame>" (resume history)
--   og:dedup:<rid>:<version>   event id of that order version
--   og:leader, og:leader:epoch poller lock and its fencing epoch
--   og:poll:cursor, og:poll:last, og:poll:known:<rid>  poller progress

local UUID = '^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function lease_is_current(token)
  return redis.call('GET', 'og:leader') == token
end

-- FCALL og_publish_v2 0 <restaurant_id> <version or ""> <event json without event_id> [<lease>]
-- Deduplicates by order version, numbers the event, records it in the
-- restaurant's history and publishes it on orders:<restaurant_id>, as one
-- atomic step. Returns {event_id, duplicate (0|1)}.
local function og_publish(keys, args)
  local rid, version, body, lease = args[1], args[2], args[3], args[4]
  if rid == nil or version == nil or body == nil then
    return redis.error_reply('ERR usage: FCALL og_publish 0 <restaurant_id> <version|""> <event_json> [lease]')
  end
  if not string.match(rid, UUID) then
    return redis.error_reply('ERR restaurant_id must be a lowercase uuid')
  end
  local rest = string.match(body, '^%s*{%s*(.*)$')
  local ok, decoded = pcall(cjson.decode, body)
  if rest == nil or not ok or type(decoded) ~= 'table' then
    return redis.error_reply('ERR event must be a JSON object')
  end
  -- The id is ours to assign: a body that brings one would become a frame
  -- with two event_id keys, dropped by every replica after consuming a
  -- sequence number.
  if decoded['event_id'] ~= nil then
    return redis.error_reply('ERR event must not contain event_id: it is assigned by og_publish')
  end
  if lease ~= nil and lease ~= '' and not lease_is_current(lease) then
    return redis.error_reply('FENCED stale leader lease')
  end
  local dedup = nil
  if version ~= '' then
    dedup = 'og:dedup:' .. rid .. ':' .. version
    local prior = redis.call('GET', dedup)
    if prior then
      return {prior, 1}
    end
  end
  local cfg = redis.call('HMGET', 'og:config', 'history_max_events', 'history_max_age_ms', 'dedup_ttl_ms')
  local max_events = tonumber(cfg[1]) or 1000
  local max_age = tonumber(cfg[2]) or 3600000
  local dedup_ttl = tonumber(cfg[3]) or 86400000
  local meta = 'og:meta:' .. rid
  local hist = 'og:hist:' .. rid
  local now = now_ms()
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    -- A new history: its epoch is "now", larger than any lost one, so ids
    -- keep increasing and old ids are recognised as belonging to a lost past.
    epoch = string.format('%013d', now)
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local id = epoch .. '-' .. string.format('%012d', seq)
  local frame
  if string.sub(rest, 1, 1) == '}' then
    frame = '{"event_id":"' .. id .. '"}'
  else
    frame = '{"event_id":"' .. id .. '",' .. rest
  end
  redis.call('ZADD', hist, seq, now .. '|' .. frame)
  local n = redis.call('ZCARD', hist)
  if n > max_events then
    redis.call('ZREMRANGEBYRANK', hist, 0, n - max_events - 1)
  end
  for _ = 1, 64 do
    local oldest = redis.call('ZRANGE', hist, 0, 0)
    if #oldest == 0 then break end
    local at = tonumber(string.match(oldest[1], '^(%d+)|'))
    if at ~= nil and at < now - max_age then
      redis.call('ZREMRANGEBYRANK', hist, 0, 0)
    else
      break
    end
  end
  redis.call('PEXPIRE', hist, max_age)
  redis.call('PEXPIRE', meta, max_age)
  if dedup then
    redis.call('SET', dedup, id, 'PX', dedup_ttl)
  end
  redis.call('PUBLISH', 'orders:' .. rid, frame)
  return {id, 0}
end

-- FCALL_RO og_history 0 <restaurant_id> <epoch> <seq>
-- {"ok", "<ms>|<frame>", ...} for every event after epoch-seq, or {"gone"}
-- when they cannot all be given (other epoch, unknown id, trimmed).
local function og_history(keys, args)
  local rid, epoch, after = args[1], args[2], tonumber(args[3])
  local m = redis.call('HMGET', 'og:meta:' .. rid, 'epoch', 'seq')
  if not m[1] or m[1] ~= epoch or after == nil then return {'gone'} end
  local seq = tonumber(m[2])
  if after > seq then return {'gone'} end
  local hist = 'og:hist:' .. rid
  local oldest = redis.call('ZRANGE', hist, 0, 0, 'WITHSCORES')
  local oldest_kept = seq + 1
  if #oldest > 0 then oldest_kept = tonumber(oldest[2]) end
  if after + 1 < oldest_kept then return {'gone'} end
  local out = redis.call('ZRANGEBYSCORE', hist, '(' .. after, '+inf')
  table.insert(out, 1, 'ok')
  return out
end

-- FCALL_RO og_last 0 <restaurant_id> -> {epoch, seq} or nil
local function og_last(keys, args)
  local m = redis.call('HMGET', 'og:meta:' .. args[1], 'epoch', 'seq')
  if not m[1] then return false end
  return {m[1], m[2]}
end

-- FCALL og_leader_acquire 0 <instance_id> <ttl_ms> <nonce> -> lease token or nil
local function og_leader_acquire(keys, args)
  if redis.call('EXISTS', 'og:leader') == 1 then return false end
  local epoch = redis.call('INCR', 'og:leader:epoch')
  local token = epoch .. ':' .. args[1] .. ':' .. args[3]
  redis.call('SET', 'og:leader', token, 'PX', args[2])
  return token
end

-- FCALL og_leader_renew 0 <token> <ttl_ms> -> 1 if still ours
local function og_leader_renew(keys, args)
  if lease_is_current(args[1]) then
    redis.call('PEXPIRE', 'og:leader', args[2])
    return 1
  end
  return 0
end

-- FCALL og_leader_release 0 <token>
local function og_leader_release(keys, args)
  if lease_is_current(args[1]) then
    redis.call('DEL', 'og:leader')
    return 1
  end
  return 0
end

-- FCALL og_poller_save 0 <token> <cursor_micros> <last_poll_ms> <json {forget:[rid], changes:{rid:{field:value|null}}}>
local function og_poller_save(keys, args)
  if not lease_is_current(args[1]) then
    return redis.error_reply('FENCED stale leader lease')
  end
  redis.call('SET', 'og:poll:cursor', args[2])
  redis.call('SET', 'og:poll:last', args[3])
  local d = cjson.decode(args[4])
  for _, rid in ipairs(d.forget) do
    redis.call('DEL', 'og:poll:known:' .. rid)
  end
  for rid, fields in pairs(d.changes) do
    local key = 'og:poll:known:' .. rid
    for f, v in pairs(fields) do
      if v == cjson.null then
        redis.call('HDEL', key, f)
      else
        redis.call('HSET', key, f, v)
      end
    end
    redis.call('PEXPIRE', key, 86400000)
  end
  return 1
end

redis.register_function('og_publish' .. VERSION, og_publish)
redis.register_function{function_name = 'og_history' .. VERSION, callback = og_history, flags = {'no-writes'}}
redis.register_function{function_name = 'og_last' .. VERSION, callback = og_last, flags = {'no-writes'}}
redis.register_function('og_leader_acquire' .. VERSION, og_leader_acquire)
redis.register_function('og_leader_renew' .. VERSION, og_leader_renew)
redis.register_function('og_leader_release' .. VERSION, og_leader_release)
redis.register_function('og_poller_save' .. VERSION, og_poller_save)
