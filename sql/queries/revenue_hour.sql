-- per tenant: revenue by hour from the hourly rollup: hours starting in [from, to).
SELECT
    hour AS t,
    round(sumMerge(revenue), 2) AS revenue,  -- Float64 sums drift: money to cents
    countMerge(events) AS events,
    uniqMerge(users) AS users
FROM demo.events_hourly
WHERE tenant_id = {tenant}
  AND hour >= {from} AND hour < {to}
  AND (empty({country}) OR has({country}, country))
  AND (empty({plan}) OR has({plan}, plan))
GROUP BY t
ORDER BY t
