-- POST /api/images/{md5}/renew for a random md5 from BENCH_LIST (one md5 a line).
local md5s = {}
n201, n200, nother = 0, 0, 0

function init(args)
  for line in io.lines(os.getenv("BENCH_LIST")) do
    if line ~= "" then md5s[#md5s + 1] = line end
  end
  math.randomseed(os.time() * 1000 + tid)
  wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")
end

function request()
  return wrk.format("POST", "/api/images/" .. md5s[math.random(#md5s)] .. "/renew")
end

function response(status, headers, body)
  if status == 200 then n200 = n200 + 1 else nother = nother + 1 end
end
