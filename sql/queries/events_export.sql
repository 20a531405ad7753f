-- per tenant: the raw events in [from, to), optionally filtered. Streamed, never cached.
SELECT ts, user_id, country, plan, event, revenue
FROM demo.events
WHERE tenant_id = {tenant}
  AND ts >= {from} AND ts < {to}
  AND (empty({country}) OR has({country}, country))
  AND (empty({plan}) OR has({plan}, plan))
  AND (empty({event}) OR has({event}, event))
