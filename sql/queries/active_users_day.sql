-- per tenant: distinct users and events in the current day.
SELECT uniq(user_id) AS users, count() AS events, toDateTime(toStartOfDay(now())) AS since
FROM demo.events
WHERE tenant_id = {tenant} AND ts >= toStartOfDay(now())
