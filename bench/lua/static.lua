-- One fixed request (the URL given to wrk); optional extra header from the
-- environment: BENCH_INM = If-None-Match value.
local inm = os.getenv("BENCH_INM")
if inm and inm ~= "" then
  wrk.headers["If-None-Match"] = inm
end

-- BENCH_DELAY_MS: each connection waits this long between requests, for a
-- steady load below saturation (latency, not queueing, then shows in p99).
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if delay_ms and delay_ms > 0 then
  function delay()
    return delay_ms
  end
end
