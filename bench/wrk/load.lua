-- The one wrk script every bench/run.sh load uses, so wrk does the same work in every scenario.
--
--   wrk -t T -c C -d D --latency -s bench/wrk/load.lua URL -- key=value ...
--
-- Keys (all optional):
--   mode=plain     GET path on every request (scenarios 1-3)
--   mode=proxy     GET path with `Authorization: Bearer <token>` rotating over `file` (scenario 4;
--                  the tokens carry a `sid` claim, so no X-Session-Id is needed)
--   mode=create    POST <api>/create with `body` (a JSON file), rotating tokens over `file`
--   mode=get       GET <api>/<sid>, rotating "token sid" lines of `file`
--   mode=list      GET <api>/user/sessions, rotating tokens over `file`
--   path=/x        request path (plain, proxy); api=/api/v1/sessions (create, get, list)
--   file=PATH      one "token [sid]" per line
--   body=PATH      request body for create
--   rate=R         total requests per second across all threads (wrk2-style constant rate: each
--                  thread claims send slots on its own schedule, R/threads per second); 0 = flat out
--   stop=N         total requests after which every thread stops issuing (N/threads each)
--   threads=T      wrk's -t, to split rate and stop
-- Every request is built once at start-up; per request wrk only picks the next prepared string.
-- done() prints one line `BENCH_RESULT {json}` with counts and latency percentiles (microseconds).

local next_thread_id = 0
local all_threads = {}

function setup(thread)
  thread:set("id", next_thread_id)
  next_thread_id = next_thread_id + 1
  all_threads[#all_threads + 1] = thread
end

-- Pacing, per thread (read by done() through thread:get): requests sent more than LATE_MS
-- after their slot, the schedule's restarts, and the worst lateness. Time a request waited for
-- its send is not in its latency, so these say how far the paced percentiles can be trusted.
local LATE_MS = 2
late_slots = 0
restarts = 0
worst_late_ms = 0

local requests_ready = {}
local n_ready = 0
local cursor = 0
local issued = 0
local quota = 0
local harmless = nil

local function read_lines(path)
  local lines = {}
  local f = assert(io.open(path, "r"))
  for line in f:lines() do
    if #line > 0 then lines[#lines + 1] = line end
  end
  f:close()
  return lines
end

local function read_all(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

function init(args)
  local cfg = { mode = "plain", path = "/", api = "/api/v1/sessions", rate = "0", stop = "0", threads = "1" }
  for _, a in ipairs(args) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k then cfg[k] = v end
  end
  local threads = tonumber(cfg.threads)
  local me = id or 0

  if cfg.mode == "plain" then
    requests_ready[1] = wrk.format("GET", cfg.path)
  else
    local lines = read_lines(cfg.file)
    local body = cfg.body and read_all(cfg.body) or nil
    -- Each thread starts at its own offset so threads do not walk the same users in step.
    local start = math.floor(#lines * me / threads)
    for i = 1, #lines do
      local line = lines[((start + i - 1) % #lines) + 1]
      local token, sid = line:match("^(%S+)%s*(%S*)$")
      local h = { ["Authorization"] = "Bearer " .. token }
      local req
      if cfg.mode == "proxy" then
        req = wrk.format("GET", cfg.path, h)
      elseif cfg.mode == "create" then
        h["Content-Type"] = "application/json"
        req = wrk.format("POST", cfg.api .. "/create", h, body)
      elseif cfg.mode == "get" then
        req = wrk.format("GET", cfg.api .. "/" .. sid, h)
      elseif cfg.mode == "list" then
        req = wrk.format("GET", cfg.api .. "/user/sessions", h)
      else
        error("unknown mode " .. cfg.mode)
      end
      requests_ready[i] = req
    end
  end
  n_ready = #requests_ready
  harmless = wrk.format("GET", cfg.api .. "/openapi.json")

  quota = math.floor(tonumber(cfg.stop) / threads)
  local rate = tonumber(cfg.rate) / threads
  if rate > 0 then
    -- Constant rate: LuaJIT's FFI reads the monotonic clock; each call to delay() claims the
    -- next send slot of this thread and waits until it (wrk's timers have 1 ms resolution, so a
    -- request may go up to 1 ms after its slot, never before; the average rate is exact).
    local ffi = require("ffi")
    ffi.cdef [[
      typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
      int clock_gettime(int clk_id, bench_timespec *tp);
    ]]
    local ts = ffi.new("bench_timespec")
    local function now_ms()
      ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
    end
    local interval = 1000 / rate
    local next_slot = nil
    delay = function()
      local now = now_ms()
      if next_slot == nil or next_slot < now - 50 then
        -- First request, or fell behind by more than 50 ms (the server stalled): restart the
        -- schedule from now instead of bursting to catch up.
        if next_slot ~= nil then restarts = restarts + 1 end
        next_slot = now
      end
      local slot = next_slot
      next_slot = next_slot + interval
      local wait = slot - now
      if wait < 0 then
        if -wait > LATE_MS then late_slots = late_slots + 1 end
        if -wait > worst_late_ms then worst_late_ms = -wait end
        return 0
      end
      return math.ceil(wait)
    end
  end
end

function request()
  if quota > 0 then
    issued = issued + 1
    if issued > quota then
      wrk.thread:stop()
      return harmless
    end
  end
  cursor = cursor + 1
  if cursor > n_ready then cursor = 1 end
  return requests_ready[cursor]
end

function done(summary, latency, requests)
  local e = summary.errors
  local late, restarted, worst = 0, 0, 0
  for _, thread in ipairs(all_threads) do
    late = late + (thread:get("late_slots") or 0)
    restarted = restarted + (thread:get("restarts") or 0)
    worst = math.max(worst, thread:get("worst_late_ms") or 0)
  end
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"p999_us":%d,"max_us":%d,"mean_us":%.1f,"late_slots":%d,"restarts":%d,'
      .. '"worst_late_ms":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, late, restarted, worst))
end
