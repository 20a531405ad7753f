// Runs tests/clients/cases.json with @clickhouse/client against one server.
//
//   node client.mjs URL USER PASSWORD
//
// Prints one JSON object per case: its rows, or the ClickHouse error code it
// failed with. tests/it/chhttp.rs runs it against ClickHouse directly and
// through dashcache's ClickHouse-compatible endpoint and compares the output.
import { createClient } from '@clickhouse/client'
import { readFileSync } from 'node:fs'

const [url, username, password] = process.argv.slice(2)
const client = createClient({ url, username, password })
const cases = JSON.parse(readFileSync(new URL('./cases.json', import.meta.url)))
for (const c of cases) {
  const out = { case: c.case }
  try {
    if (c.command) {
      await client.command({ query: c.command, clickhouse_settings: c.settings })
      out.result = 'ok'
    } else {
      for (const format of ['JSONEachRow', 'JSON', 'CSVWithNames', 'TabSeparatedWithNamesAndTypes']) {
        const rs = await client.query({ query: c.sql, format, clickhouse_settings: c.settings })
        const value = format.startsWith('JSON') ? await rs.json() : await rs.text()
        out[format] = format === 'JSON' ? { meta: value.meta, data: value.data, rows: value.rows } : value
      }
    }
  } catch (e) {
    const code = e.code !== undefined ? Number(e.code) : Number((/Code: (\d+)/.exec(String(e.message)) || [])[1])
    out.error_code = Number.isNaN(code) ? null : code
    if (out.error_code === null) out.error = String(e.message).slice(0, 300)
  }
  console.log(JSON.stringify(out))
}
await client.close()
