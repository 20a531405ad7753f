-- per tenant: revenue by minute, straight from the raw events (ranges up to a day).
SELECT
    toStartOfMinute(ts) AS t,
    round(sum(revenue), 2) AS revenue,  -- Float64 sums drift: money to cents
    count() AS events,
    uniq(user_id) AS users
FROM demo.events
WHERE tenant_id = {tenant}
  AND ts >= {from} AND ts < {to}
  AND (empty({country}) OR has({country}, country))
  AND (empty({plan}) OR has({plan}, plan))
GROUP BY t
ORDER BY t
