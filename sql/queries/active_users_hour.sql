-- distinct users and events in the current hour.
SELECT uniq(user_id) AS users, count() AS events, toStartOfHour(now()) AS since
FROM demo.events
WHERE ts >= toStartOfHour(now())
