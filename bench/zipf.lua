-- wrk script: requests paths from a file, picked by a Zipf distribution over their rank.
--   wrk ... -s bench/zipf.lua URL -- PATHS_FILE [ZIPF_S] [HEADER_LINE]
-- PATHS_FILE: one request path per line (rank 1 = first line = hottest).
-- ZIPF_S: exponent (default 1.0). HEADER_LINE: optional "Name: value" added to every request
-- (the API key once the proxy requires one).
-- At the end one machine-readable line is printed:
--   BENCH requests=N duration_s=S rps=R p50_us=.. p99_us=.. p999_us=.. max_us=.. errors=E non2xx=N
local paths, cdf, reqs = {}, {}, {}
local n = 0

local function load(file, s, header)
  for line in io.lines(file) do
    if #line > 0 then
      n = n + 1
      paths[n] = line
    end
  end
  assert(n > 0, "no paths in " .. file)
  local total = 0
  for i = 1, n do
    total = total + 1 / (i ^ s)
    cdf[i] = total
  end
  for i = 1, n do cdf[i] = cdf[i] / total end
  local headers = {}
  if header and #header > 0 then
    local name, value = header:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  for i = 1, n do reqs[i] = wrk.format("GET", paths[i], headers) end
end

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

function init(args)
  load(args[1], tonumber(args[2] or "1.0"), args[3])
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

function request()
  local r = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < r then lo = mid + 1 else hi = mid end
  end
  return reqs[lo]
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_s=%.3f rps=%.1f p50_us=%d p99_us=%d p999_us=%d max_us=%d errors=%d non2xx=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
