-- per tenant: countries by revenue over the days starting in [from, to).
SELECT
    country,
    round(sumMerge(revenue), 2) AS revenue,  -- Float64 sums drift: money to cents
    countMerge(events) AS events,
    uniqMerge(users) AS users
FROM demo.events_daily
WHERE tenant_id = {tenant}
  AND day BETWEEN toDate({from}) AND toDate({to})
  AND toDateTime(day) >= {from} AND toDateTime(day) < {to}
GROUP BY country
ORDER BY revenue DESC, country
LIMIT {limit} OFFSET {offset}
