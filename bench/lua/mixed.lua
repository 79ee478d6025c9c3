-- GET a random path from the file named by BENCH_LIST (one URL path a line).
local paths = {}

function init(args)
  for line in io.lines(os.getenv("BENCH_LIST")) do
    if line ~= "" then paths[#paths + 1] = line end
  end
  math.randomseed(os.time() * 1000 + tid)
  for _ = 1, 10 do math.random() end
end

function request()
  return wrk.format("GET", paths[math.random(#paths)])
end
