#!lua name=orders_gateway_v2
-- Versioned: the library is orders_gateway_v<N> and every function is
-- registered as <name>_v<N> (N = LIBRARY_VERSION in src/broker/functions.rs;
-- bump both, and this line, on any change of semantics, arguments or keys).
-- During a rolling deploy old and new replicas each load and call their own
-- version side by side: a new replica never replaces a function an old one
-- calls, and an old replica's LOAD REPLACE never overwrites newer code.
-- Server-side steps of orders-gateway, installed by every replica at start
-- (FUNCTION LOAD REPLACE) and again whenever Redis answers "function not
-- found" (a restarted Redis without persistence). The gateway fills in the
-- @LIMITS@ line before loading, so no function reads a global config key:
-- every function touches only the keys it declares, all of one hash slot,
-- which is what Redis Cluster requires.
--
-- Keys. Per restaurant, hash-tagged with the channel name so that they live
-- in the slot of the channel `orders:<rid>` itself:
--   og:{orders:<rid>}:meta            epoch, seq, floor, fence   (numbering)
--   og:{orders:<rid>}:hist            zset seq -> "<ms>|<frame>"  (resume history)
--   og:{orders:<rid>}:v:<order_id>    "<updated_at µs>|<event id>" newest version published
-- Global, all in the slot of the tag {og}:
--   og:{og}:leader, og:{og}:leader:epoch          poller lock and its fencing epoch
--   og:{og}:poll:cursor, og:{og}:poll:last, og:{og}:poll:known:<rid>,
--   og:{og}:poll:restaurants                      poller progress
--
-- Event ids are "<epoch: 13 digits>-<seq: 12 digits>". The epoch is the
-- Redis time (ms) at which the restaurant's history began. The seq is the
-- number of microseconds since the epoch at which the event was numbered,
-- or one more than the previous seq when that is larger. Time-based, not a
-- plain counter, so that ids are never issued twice even when Redis loses
-- its most recent writes (an asynchronous replica promoted, a restore, AOF
-- everysec): ids issued after the loss are later in time than the lost
-- ones, so a client holding a lost id never sees a new event under it; its
-- resume finds the id missing from history and is told to resync.

local VERSION = '_v2'
-- @LIMITS@
local MAX_EVENTS, MAX_AGE_MS, DEDUP_TTL_MS, PUBLISH = 1000, 3600000, 86400000, 'PUBLISH'

local UUID = '^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$'
local MAX_SEQ = 999999999999
-- Sharded pub/sub means Redis Cluster; otherwise one node, where a function
-- may read the leader key beside the restaurant's.
local SINGLE_NODE = PUBLISH == 'PUBLISH'
local LEADER, LEADER_EPOCH = 'og:{og}:leader', 'og:{og}:leader:epoch'

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function tag(rid)
  return 'og:{orders:' .. rid .. '}'
end

local function check_keys(keys, expected)
  for i, k in ipairs(expected) do
    if keys[i] ~= k then
      return redis.error_reply('ERR key ' .. i .. ' must be ' .. k)
    end
  end
  return nil
end

-- The epoch of a lease token "<epoch>:<instance>:<nonce>".
local function lease_epoch(token)
  return tonumber(string.match(token, '^(%d+):'))
end

-- Drop the oldest history entry, remembering its seq as the floor: an id at
-- the floor is still a valid resume point (nothing after it was lost).
local function trim_oldest(meta, hist)
  local oldest = redis.call('ZRANGE', hist, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return nil end
  redis.call('ZREMRANGEBYRANK', hist, 0, 0)
  redis.call('HSET', meta, 'floor', oldest[2])  -- a score: Redis formats it
  return oldest[1]
end

-- FCALL og_publish 3 og:{orders:<rid>}:meta og:{orders:<rid>}:hist og:{orders:<rid>}:v:<order_id>
--       <rid> <version "<order_id>@<updated_at µs>" or ""> <event json without event_id> [<lease>]
-- (With an empty version the third key is omitted: FCALL og_publish 2 ...)
-- The gateway's poller passes its lease. On a single Redis node the lease
-- must be the current one (og:{og}:leader). On Redis Cluster that key lives
-- in another slot, so only the per-restaurant fence applies: a lease older than one already used on this
-- restaurant is refused. (A stale leader can then still publish a version
-- newer than any published for that order -- a true change -- but never
-- repeat or regress one; see docs/OPERATIONS.md.)
-- Numbers the event, records it in the restaurant's history and publishes
-- it on orders:<rid>, as one atomic step. An order version already
-- published, or older than one already published, is not published again:
-- the answer is {event id of the newest published version, 1}. Otherwise
-- {event_id, 0}. A lease older than one already used on this restaurant is
-- refused with FENCED.
local function og_publish(keys, args)
  local rid, version, body, lease = args[1], args[2], args[3], args[4]
  if rid == nil or version == nil or body == nil then
    return redis.error_reply('ERR usage: FCALL og_publish 3 <meta> <hist> <version key> <restaurant_id> <version|""> <event_json> [lease]')
  end
  if not string.match(rid, UUID) then
    return redis.error_reply('ERR restaurant_id must be a lowercase uuid')
  end
  local meta, hist = tag(rid) .. ':meta', tag(rid) .. ':hist'
  -- micros_s keeps the digits: Lua numbers print in exponent notation.
  local order_id, micros, micros_s = nil, nil, nil
  if version ~= '' then
    order_id, micros = string.match(version, '^(%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x)@(%d+)$')
    if order_id == nil then
      return redis.error_reply('ERR version must be "<order uuid>@<updated_at microseconds>"')
    end
    micros_s = micros
    micros = tonumber(micros)
  end
  local expected = {meta, hist}
  if order_id then expected[3] = tag(rid) .. ':v:' .. order_id end
  local bad = check_keys(keys, expected)
  if bad then return bad end
  local ok, decoded = pcall(cjson.decode, body)
  if not ok or type(decoded) ~= 'table' or string.match(body, '^%s*%[') then
    return redis.error_reply('ERR event must be a JSON object')
  end
  if decoded['event_id'] ~= nil then
    return redis.error_reply('ERR event must not carry an event_id: the function assigns it')
  end
  if type(decoded['type']) ~= 'string' or decoded['type'] == '' then
    return redis.error_reply('ERR event must have a string "type"')
  end
  if lease ~= nil and lease ~= '' then
    local e = lease_epoch(lease)
    if e == nil then return redis.error_reply('ERR malformed lease') end
    local fence = tonumber(redis.call('HGET', meta, 'fence') or '0')
    if fence > e or (SINGLE_NODE and redis.call('GET', LEADER) ~= lease) then
      return redis.error_reply('FENCED stale leader lease')
    end
  end
  if order_id then
    local prior = redis.call('GET', expected[3])
    if prior then
      local at, id = string.match(prior, '^(%d+)|(.+)$')
      if at and tonumber(at) >= micros then
        return {id, 1}
      end
    end
  end

  local now = now_us()
  local now_ms = math.floor(now / 1000)
  local m = redis.call('HMGET', meta, 'epoch', 'seq')
  local epoch, seq = m[1], tonumber(m[2] or '0')
  local next_seq = nil
  if epoch then
    next_seq = math.max(seq + 1, now - tonumber(epoch) * 1000)
    if next_seq > MAX_SEQ then epoch = nil end
  end
  if not epoch then
    -- A new history: its epoch is "now", larger than any earlier one, so ids
    -- keep increasing and ids of an earlier history are recognised as such.
    epoch = string.format('%013d', now_ms)
    next_seq = 1
    redis.call('DEL', hist)
    redis.call('HSET', meta, 'epoch', epoch, 'floor', 0)
  end
  redis.call('HSET', meta, 'seq', string.format('%d', next_seq))
  if lease ~= nil and lease ~= '' then
    redis.call('HSET', meta, 'fence', string.format('%d', lease_epoch(lease)))
  end
  local id = epoch .. '-' .. string.format('%012d', next_seq)
  local rest = string.match(body, '^%s*{%s*(.*)$')
  local frame
  if string.sub(rest, 1, 1) == '}' then
    frame = '{"event_id":"' .. id .. '"}'
  else
    frame = '{"event_id":"' .. id .. '",' .. rest
  end
  redis.call('ZADD', hist, next_seq, string.format('%d', now_ms) .. '|' .. frame)
  local n = redis.call('ZCARD', hist)
  while n > MAX_EVENTS do
    trim_oldest(meta, hist)
    n = n - 1
  end
  for _ = 1, 64 do
    local oldest = redis.call('ZRANGE', hist, 0, 0)
    if #oldest == 0 then break end
    local at = tonumber(string.match(oldest[1], '^(%d+)|'))
    if at ~= nil and at < now_ms - MAX_AGE_MS then
      trim_oldest(meta, hist)
    else
      break
    end
  end
  redis.call('PEXPIRE', hist, MAX_AGE_MS)
  redis.call('PEXPIRE', meta, MAX_AGE_MS)
  if order_id then
    redis.call('SET', expected[3], micros_s .. '|' .. id, 'PX', DEDUP_TTL_MS)
  end
  redis.call(PUBLISH, 'orders:' .. rid, frame)
  return {id, 0}
end

-- FCALL_RO og_history 2 og:{orders:<rid>}:meta og:{orders:<rid>}:hist <rid> <epoch> <seq>
-- {"ok", "<ms>|<frame>", ...}: every event after epoch-seq, oldest first;
-- or {"gone"} when they cannot all be given: another epoch, an id that was
-- never issued or was lost (a Redis that lost writes), or trimmed history.
-- With an empty <epoch>, <seq> is a Redis time in ms: every event of a
-- history that began at or after it ({"ok"} when there is none).
local function og_history(keys, args)
  local rid, epoch, after = args[1], args[2], tonumber(args[3])
  if rid == nil or epoch == nil or after == nil then
    return redis.error_reply('ERR usage: FCALL_RO og_history 2 <meta> <hist> <restaurant_id> <epoch> <seq>')
  end
  local meta, hist = tag(rid) .. ':meta', tag(rid) .. ':hist'
  local bad = check_keys(keys, {meta, hist})
  if bad then return bad end
  local m = redis.call('HMGET', meta, 'epoch', 'seq', 'floor')
  if epoch == '' then
    if not m[1] then return {'ok'} end
    if tonumber(m[1]) < after or tonumber(m[3] or '0') ~= 0 then return {'gone'} end
    local out = redis.call('ZRANGEBYSCORE', hist, '-inf', '+inf')
    table.insert(out, 1, 'ok')
    return out
  end
  if not m[1] or m[1] ~= epoch then return {'gone'} end
  local seq, floor = tonumber(m[2]), tonumber(m[3] or '0')
  if after > seq or after < floor then return {'gone'} end
  if after ~= floor and redis.call('ZCOUNT', hist, args[3], args[3]) == 0 then
    -- Never issued, or issued and then lost: the client holds an id from a
    -- history this Redis no longer has.
    return {'gone'}
  end
  local out = redis.call('ZRANGEBYSCORE', hist, '(' .. args[3], '+inf')
  table.insert(out, 1, 'ok')
  return out
end

-- FCALL_RO og_last 1 og:{orders:<rid>}:meta <rid> -> {epoch, seq} of the
-- newest event, or {"", <Redis time in ms>} when there is no history: a
-- history found later began after that time (see og_history).
local function og_last(keys, args)
  local rid = args[1]
  if rid == nil then
    return redis.error_reply('ERR usage: FCALL_RO og_last 1 <meta> <restaurant_id>')
  end
  local bad = check_keys(keys, {tag(rid) .. ':meta'})
  if bad then return bad end
  local m = redis.call('HMGET', keys[1], 'epoch', 'seq')
  if not m[1] then return {'', tostring(math.floor(now_us() / 1000))} end
  return {m[1], m[2]}
end

local function lease_is_current(token)
  return redis.call('GET', LEADER) == token
end

-- FCALL og_leader_acquire 2 og:{og}:leader og:{og}:leader:epoch <instance_id> <ttl_ms> <nonce> -> lease token or nil
local function og_leader_acquire(keys, args)
  local bad = check_keys(keys, {LEADER, LEADER_EPOCH})
  if bad then return bad end
  if redis.call('EXISTS', LEADER) == 1 then return false end
  local epoch = redis.call('INCR', LEADER_EPOCH)
  local token = epoch .. ':' .. args[1] .. ':' .. args[3]
  redis.call('SET', LEADER, token, 'PX', args[2])
  return token
end

-- FCALL og_leader_renew 1 og:{og}:leader <token> <ttl_ms> -> 1 if still ours
local function og_leader_renew(keys, args)
  local bad = check_keys(keys, {LEADER})
  if bad then return bad end
  if lease_is_current(args[1]) then
    redis.call('PEXPIRE', LEADER, args[2])
    return 1
  end
  return 0
end

-- FCALL og_leader_release 1 og:{og}:leader <token>
local function og_leader_release(keys, args)
  local bad = check_keys(keys, {LEADER})
  if bad then return bad end
  if lease_is_current(args[1]) then
    redis.call('DEL', LEADER)
    return 1
  end
  return 0
end

-- FCALL og_poller_save 1 og:{og}:leader <token> <cursor_micros> <last_poll_ms> <json {changes:{rid:{field:value|null}}}>
-- Every key it writes carries the {og} tag: one slot with the lock.
-- og:{og}:poll:restaurants lists the restaurants with known state, so a new
-- leader loads all of them. Known state never expires: the poller removes
-- closed and deleted orders itself, and an open order must still be known
-- after a quiet day (else its next status change arrives as order_updated).
local function og_poller_save(keys, args)
  local bad = check_keys(keys, {LEADER})
  if bad then return bad end
  if not lease_is_current(args[1]) then
    return redis.error_reply('FENCED stale leader lease')
  end
  redis.call('SET', 'og:{og}:poll:cursor', args[2])
  redis.call('SET', 'og:{og}:poll:last', args[3])
  local d = cjson.decode(args[4])
  for rid, fields in pairs(d.changes) do
    local key = 'og:{og}:poll:known:' .. rid
    for f, v in pairs(fields) do
      if v == cjson.null then
        redis.call('HDEL', key, f)
      else
        redis.call('HSET', key, f, v)
      end
    end
    if redis.call('EXISTS', key) == 1 then
      redis.call('PERSIST', key)
      redis.call('SADD', 'og:{og}:poll:restaurants', rid)
    else
      redis.call('SREM', 'og:{og}:poll:restaurants', rid)
    end
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
