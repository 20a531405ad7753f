"""Runs tests/clients/cases.json with clickhouse-connect against one server.

    python connect.py HOST PORT USER PASSWORD

Prints one JSON object per case: its rows, or the ClickHouse error code it
failed with. tests/it/chhttp.rs runs it against ClickHouse directly and
through dashcache's ClickHouse-compatible endpoint and compares the output.
"""
import json
import os
import re
import sys

import clickhouse_connect

host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
client = clickhouse_connect.get_client(host=host, port=port, username=user, password=password)
with open(os.path.join(os.path.dirname(__file__), "cases.json")) as f:
    cases = json.load(f)
for case in cases:
    out = {"case": case["case"]}
    try:
        if "command" in case:
            client.command(case["command"], settings=case.get("settings"))
            out["result"] = "ok"
        else:
            result = client.query(case["sql"], settings=case.get("settings"))
            out["columns"] = list(result.column_names)
            out["rows"] = [[str(v) for v in row] for row in result.result_rows]
    except Exception as e:  # the error code is what is compared
        match = re.search(r"Code: (\d+)", str(e))
        out["error_code"] = int(match.group(1)) if match else None
        if match is None:
            out["error"] = str(e)[:300]
    print(json.dumps(out), flush=True)
