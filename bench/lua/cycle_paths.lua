-- wrk script for bench/fhir_bench.py: GET the request paths listed in a file (one per line), in
-- order, round and round; thread k of T starts k/T of the way into the list, so threads do not send
-- the same path at the same time. At the end it prints one line, `FHIRBENCH {json}`, with the
-- latency percentiles (microseconds) and the error counts, for the benchmark to parse.
--
--   wrk -t2 -c8 -d5s --timeout 10s -s cycle_paths.lua http://127.0.0.1:PORT -- PATHS_FILE THREADS

local next_thread = 0

function setup(thread)
  thread:set("thread_index", next_thread)
  next_thread = next_thread + 1
end

function init(args)
  local file, threads = args[1], tonumber(args[2] or "1")
  if file == nil then
    error("usage: wrk ... -s cycle_paths.lua URL -- PATHS_FILE THREADS")
  end
  local headers = { ["Accept"] = "application/fhir+json" }
  requests = {}
  for line in io.lines(file) do
    if #line > 0 then
      -- built once: wrk then only copies the bytes out for every request
      requests[#requests + 1] = wrk.format("GET", line, headers)
    end
  end
  if #requests == 0 then
    error("no request paths in " .. file)
  end
  position = math.floor((thread_index or 0) * #requests / math.max(threads, 1))
end

function request()
  position = position % #requests + 1
  return requests[position]
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    'FHIRBENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"mean_us":%.1f,"stdev_us":%.1f,'
      .. '"min_us":%d,"p50_us":%d,"p90_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99), latency.max
  ))
end
