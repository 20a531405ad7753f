-- per tenant: revenue by day from the daily rollup: days starting in [from, to).
SELECT
    toDateTime(day) AS t,
    round(sumMerge(revenue), 2) AS revenue,  -- Float64 sums drift: money to cents
    countMerge(events) AS events,
    uniqMerge(users) AS users
FROM demo.events_daily
WHERE tenant_id = {tenant}
  AND day BETWEEN toDate({from}) AND toDate({to})
  AND toDateTime(day) >= {from} AND toDateTime(day) < {to}
  AND (empty({country}) OR has({country}, country))
  AND (empty({plan}) OR has({plan}, plan))
GROUP BY t
ORDER BY t
