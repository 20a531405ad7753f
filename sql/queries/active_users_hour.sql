-- per tenant: distinct users and events in the current hour.
SELECT uniq(user_id) AS users, count() AS events, toStartOfHour(now()) AS since
FROM demo.events
WHERE tenant_id = {tenant} AND ts >= toStartOfHour(now())
