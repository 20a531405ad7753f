-- per tenant: revenue by minute, straight from the raw events (ranges up to a day).
SELECT
    toStartOfMinute(ts) AS t,
    sum(revenue) AS revenue,
    count() AS events,
    uniq(user_id) AS users
FROM demo.events
WHERE tenant_id = {tenant}
  AND ts >= {from} AND ts < {to}
  AND (empty({country}) OR has({country}, country))
  AND (empty({plan}) OR has({plan}, plan))
GROUP BY t
ORDER BY t
