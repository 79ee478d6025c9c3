-- PUT a different file on every request: the files named by BENCH_LIST, thread
-- t takes the files t+1, t+1+T, ... (T = BENCH_THREADS) starting at BENCH_OFFSET.
-- Files are read from disk (page cache) per request, so thousands of bodies
-- need no Lua memory. Counts 201 / 200 / other answers, and whether the list
-- ran out and wrapped round (then later bodies repeat: dedup hits).
local files = {}
local idx, step
n201, n200, nother, wrapped = 0, 0, 0, 0

function init(args)
  for line in io.lines(os.getenv("BENCH_LIST")) do
    if line ~= "" then files[#files + 1] = line end
  end
  step = tonumber(os.getenv("BENCH_THREADS") or "1")
  idx = tid + 1 + tonumber(os.getenv("BENCH_OFFSET") or "0")
  local auth = os.getenv("BENCH_AUTH")
  if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
  wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE") or "image/jpeg"
end

function request()
  if idx > #files then
    idx = ((idx - 1) % #files) + 1
    wrapped = 1
  end
  local f = assert(io.open(files[idx], "rb"))
  local body = f:read("*a")
  f:close()
  local path = "/upload/bench" .. idx .. ".jpg"
  idx = idx + step
  return wrk.format("PUT", path, nil, body)
end

function response(status, headers, body)
  if status == 201 then n201 = n201 + 1
  elseif status == 200 then n200 = n200 + 1
  else nother = nother + 1 end
end
