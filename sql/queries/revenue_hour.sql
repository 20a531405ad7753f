-- per tenant: revenue by hour from the hourly rollup: hours starting in [from, to).
SELECT
    hour AS t,
    sumMerge(revenue) AS revenue,
    countMerge(events) AS events,
    uniqMerge(users) AS users
FROM demo.events_hourly
WHERE tenant_id = {tenant}
  AND hour >= {from} AND hour < {to}
  AND (empty({country}) OR has({country}, country))
  AND (empty({plan}) OR has({plan}, plan))
GROUP BY t
ORDER BY t
