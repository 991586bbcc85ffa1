-- wrk script for bench/auth_bench.py: POST form bodies to the token endpoint, read from a file (one
-- URL-encoded form body per line, built once into complete requests when the thread starts).
--
--   wrk -t1 -c16 -d10s --latency -s token_bodies.lua http://127.0.0.1:PORT/token -- BODIES THREADS MODE
--
-- MODE "once" (client assertions: a jti is never accepted twice): thread k of T owns the bodies on
--   lines k+1, k+1+T, k+1+2T, ... and sends each of them at most once. A thread that has used its
--   whole share never replays one (the server would refuse it with 400 and count a failed client
--   authentication, and its failure limiter would then refuse that client with 429 in the next
--   run too): it sends `GET /.well-known/openid-configuration` instead and counts those requests
--   in `overflow`; the benchmark flags the run as invalid when `overflow` is not 0.
-- MODE "cycle" (a client secret: the same body every time): the bodies round and round.
--
-- Headers given with -H (Authorization for client_secret_basic) are sent with every request. At the
-- end it prints one line, `AUTHBENCH {json}`, with the latency percentiles (microseconds), the error
-- counts, how many bodies the threads had, how many token requests they built and the overflow.

local threads = {}
local next_thread = 0

function setup(thread)
  thread:set("thread_index", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

function init(args)
  local file, nthreads, mode = args[1], tonumber(args[2] or "1"), args[3] or "once"
  if file == nil then
    error("usage: wrk ... -s token_bodies.lua URL -- BODIES THREADS once|cycle")
  end
  if mode ~= "once" and mode ~= "cycle" then
    error("MODE must be once or cycle, not " .. mode)
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.headers["Accept"] = "application/json"
  local k = thread_index or 0
  requests = {}
  local n = 0
  for line in io.lines(file) do
    if #line > 0 then
      if mode == "cycle" or n % math.max(nthreads, 1) == k then
        -- built once: wrk then only copies the bytes out for every request (headers from -H included)
        requests[#requests + 1] = wrk.format("POST", nil, nil, line)
      end
      n = n + 1
    end
  end
  if #requests == 0 then
    error("no request bodies for thread " .. k .. " in " .. file)
  end
  pool = #requests
  once = mode == "once"
  spare = wrk.format("GET", "/.well-known/openid-configuration", { ["Accept"] = "application/json" }, "")
  position = 0
  sent = 0
  overflow = 0
end

function request()
  position = position + 1
  if position > #requests then
    if once then
      overflow = overflow + 1
      return spare
    end
    position = 1
  end
  sent = sent + 1
  return requests[position]
end

function done(summary, latency, requests_)
  local pool_total, sent_total, overflow_total = 0, 0, 0
  for _, thread in ipairs(threads) do
    pool_total = pool_total + (thread:get("pool") or 0)
    sent_total = sent_total + (thread:get("sent") or 0)
    overflow_total = overflow_total + (thread:get("overflow") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'AUTHBENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"mean_us":%.1f,"stdev_us":%.1f,'
      .. '"min_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,'
      .. '"bodies":%d,"built":%d,"overflow":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, pool_total, sent_total, overflow_total
  ))
end
