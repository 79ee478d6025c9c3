-- Prepended by bench/run.py to every wrk script: numbers each thread and prints
-- one machine-readable summary line (BENCHJSON) that run.py parses.
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local function extra_counts()
  local names = {"n201", "n200", "nother", "wrapped"}
  local out = ""
  for _, name in ipairs(names) do
    local total, seen = 0, false
    for _, t in ipairs(threads) do
      local v = t:get(name)
      if v ~= nil then total = total + v; seen = true end
    end
    if seen then out = out .. string.format(',"%s":%d', name, total) end
  end
  return out
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"lat_mean_us":%.1f,"lat_p50_us":%d,' ..
    '"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d%s}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, extra_counts()))
end
