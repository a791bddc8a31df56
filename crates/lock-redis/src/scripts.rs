//! The Lua scripts: each lock operation is one script call.
//!
//! Redis runs a script atomically: no other command runs between its lines.
//! That is what makes "check the holder, then write" safe without WATCH/MULTI
//! round trips, and what lets the acquire script mint the fencing token in the
//! same step as the grant (so no two grants can ever get the same token, and
//! a grant is never visible without its token).
//!
//! Every script touches only keys that share one hash tag (`prefix{key}...`),
//! so each call lands in one Redis Cluster slot.
//!
//! # Keys of one lock `K` (prefix `P`)
//! | key | type | content | expiry |
//! |---|---|---|---|
//! | `P{K}` | string | `<owner hex>:<fencing token>` | the lease TTL |
//! | `P{K}:fence` | string | the last token minted for `K` | `fence_retention` after the last grant |
//! | `P{K}:q` | sorted set | fair waiters, scored by arrival number | the longest waiter entry |
//! | `P{K}:qt` | sorted set | fair waiters, scored by their entry's deadline (server ms) | as `:q` |
//!
//! and the pub/sub channel `P{K}:rel`, on which every release publishes the
//! id of the first fair waiter (or an empty message).
//!
//! # Fencing tokens
//! `token = max(last + 1, server TIME in µs)`. The counter alone would restart
//! from 1 after a restart of a Redis that keeps nothing on disk; the server
//! clock alone could step back (NTP). Together a token is below an earlier
//! one only if the server clock stepped back by more than the time between
//! the two grants *and* the counter was lost (restart without persistence,
//! or `fence_retention` passed). µs since 1970 stay below 2^53 (exact in Lua's
//! doubles) until the year 2255; the token is formatted with `%.0f` because
//! Lua's `tostring` would round it to 14 digits.

use std::sync::LazyLock;

use redis::Script;

/// Mints the token: shared by the acquire script.
const MINT: &str = r"
local function mint(fence_key, t, retention)
  local last = tonumber(redis.call('GET', fence_key) or '0') or 0
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tok = string.format('%.0f', math.max(last + 1, now_us))
  if retention > 0 then
    redis.call('SET', fence_key, tok, 'PX', retention)
  else
    redis.call('SET', fence_key, tok)
  end
  return tok
end
";

/// Raises the counter to at least `tok` (Redlock: a later quorum that
/// overlaps this one then mints above it whatever the masters' clocks say).
const RAISE: &str = r"
local function raise(fence_key, tok, retention)
  if tok == '' then return end
  local last = tonumber(redis.call('GET', fence_key) or '0') or 0
  if last < tonumber(tok) then
    if retention > 0 then
      redis.call('SET', fence_key, tok, 'PX', retention)
    else
      redis.call('SET', fence_key, tok)
    end
  end
end
";

/// KEYS: lock, fence, q, qt.
/// ARGV: owner hex, ttl ms, fence retention ms (0 = keep), waiter id ('' =
/// not fair), waiter entry ttl ms.
/// Returns `{1, token}` (granted) or `{0, pttl}`: pttl ms left on the
/// holder's lease, -1 when the key has no expiry, -3 when the key is free
/// but fair waiters come first.
const ACQUIRE: &str = r"
local lock, fence, q, qt = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local owner, ttl, retention = ARGV[1], ARGV[2], tonumber(ARGV[3])
local waiter, entry_ttl = ARGV[4], tonumber(ARGV[5])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local behind = false
if waiter ~= '' or redis.call('EXISTS', qt) == 1 then
  -- Waiters that stopped refreshing their entry died: drop them.
  local dead = redis.call('ZRANGEBYSCORE', qt, '-inf', now_ms)
  for i = 1, #dead do
    redis.call('ZREM', q, dead[i])
    redis.call('ZREM', qt, dead[i])
  end
  if waiter ~= '' then
    if not redis.call('ZSCORE', q, waiter) then
      local last = redis.call('ZRANGE', q, -1, -1, 'WITHSCORES')
      local seq = 1
      if last[2] then seq = tonumber(last[2]) + 1 end
      redis.call('ZADD', q, seq, waiter)
    end
    redis.call('ZADD', qt, now_ms + entry_ttl, waiter)
    -- This entry's deadline is the latest of all: the queue lives as long.
    redis.call('PEXPIRE', q, entry_ttl)
    redis.call('PEXPIRE', qt, entry_ttl)
  end
  local head = redis.call('ZRANGE', q, 0, 0)[1]
  behind = head ~= nil and head ~= waiter
end
local pttl = redis.call('PTTL', lock)
if pttl ~= -2 then return {0, pttl} end
if behind then return {0, -3} end
if waiter ~= '' then
  redis.call('ZREM', q, waiter)
  redis.call('ZREM', qt, waiter)
end
local tok = mint(fence, t, retention)
redis.call('SET', lock, owner .. ':' .. tok, 'PX', ttl)
return {1, tok}
";

/// KEYS: lock, fence. ARGV: owner hex, ttl ms, token to raise the counter to
/// ('' = do not), fence retention ms. Returns 1 if extended, 0 if not ours.
const EXTEND: &str = r"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
raise(KEYS[2], ARGV[3], tonumber(ARGV[4]))
return 1
";

/// KEYS: lock, fence, q. ARGV: owner hex, channel, token to raise the
/// counter to ('' = do not), fence retention ms, publish ('1'/'0').
/// Returns 1 if released, 0 if not ours (nothing changed).
const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
raise(KEYS[2], ARGV[3], tonumber(ARGV[4]))
if ARGV[5] == '1' then
  redis.call('PUBLISH', ARGV[2], redis.call('ZRANGE', KEYS[3], 0, 0)[1] or '')
end
return 1
";

/// KEYS: lock, q, qt. ARGV: waiter id, channel. A fair waiter gives up: its
/// entry goes, and if it was first in line for a free key, the next one is
/// told.
const LEAVE: &str = r"
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if head == ARGV[1] and redis.call('EXISTS', KEYS[1]) == 0 then
  local nxt = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if nxt then redis.call('PUBLISH', ARGV[2], nxt) end
end
return 1
";

/// KEYS: lock, qt. Returns `{value or '', pttl, live waiters}`.
const INSPECT: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('GET', KEYS[1]) or ''
return {v, redis.call('PTTL', KEYS[1]), redis.call('ZCOUNT', KEYS[2], '(' .. now_ms, '+inf')}
";

pub(crate) static ACQUIRE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{MINT}{ACQUIRE}")));
pub(crate) static EXTEND_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{RAISE}{EXTEND}")));
pub(crate) static RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{RAISE}{RELEASE}")));
pub(crate) static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LEAVE));
pub(crate) static INSPECT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(INSPECT));
