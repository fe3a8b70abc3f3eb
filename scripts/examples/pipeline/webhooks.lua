-- webhooks.lua: the stage of the Redis Streams example (redis-stream.json,
-- redis.sh): "deliver" one webhook job per entry.  Entries are tables of
-- strings; item._id is the entry's id.  A job for a customer named "broken"
-- always fails, so it is delivered max_deliveries times and then lands in
-- the dead-letter stream with its error.
local M = {}

function M.deliver(job)
  if job.customer == "broken" then
    error("POST " .. job.url .. ": 500 Internal Server Error", 0)
  end
  return { job = job._id, customer = job.customer, status = 200,
           bytes = #job.url + #(job.body or "") }
end

return M
