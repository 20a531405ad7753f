-- distinct users and events in the current day.
SELECT uniq(user_id) AS users, count() AS events, toDateTime(toStartOfDay(now())) AS since
FROM demo.events
WHERE ts >= toStartOfDay(now())
