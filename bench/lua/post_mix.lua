-- wrk script for the `post` and `tls` scenarios: the keep-alive mix of docids.lua (same
-- X-Doc-Id keys, same cycle over them, same connections) where every POST_EVERY-th request
-- (10: 10 %) is a POST with a POST_BYTES (1024) body, framed by Content-Length, on the same
-- keep-alive connection. Deterministic: wrk's Lua API has no connection identity, so the
-- choice is made on each thread's request sequence (request 10, 20, 30, ... that the thread
-- sends is a POST), i.e. exactly 10 % per thread and about 10 % on each of its connections.
-- With DOC_IDS a multiple of POST_EVERY, the POSTs go to the same tenth of the keys (the
-- documents being edited), spread over the backends by the proxies' hashing like the rest.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "docids.lua")   -- doc_ids, doc_request, doc_start (and its GET-only init/request)

local n = doc_ids
local every = tonumber(os.getenv("POST_EVERY") or "10")
local size = tonumber(os.getenv("POST_BYTES") or "1024")
local gets, posts = {}, {}
local i, c = 0, 0

init = function(args)
  local body = string.rep("x", size)
  for k = 1, n do
    gets[k] = doc_request(k, "GET")
    posts[k] = doc_request(k, "POST", body)
  end
  i = doc_start()
end

request = function()
  i = (i % n) + 1
  c = c + 1
  if c % every == 0 then
    return posts[i]
  end
  return gets[i]
end
