#!/usr/bin/env bash
# One image from a running `vllm serve MODEL_DIR --decoding zipar` server, with curl; writes out/curl.png.
#   vllm serve models/digits --decoding zipar --zipar-window 8 --port 8000 &
#   bash examples/curl_request.sh [PROMPT] [URL]
set -euo pipefail
PROMPT=${1:-seven}
URL=${2:-http://127.0.0.1:8000}
mkdir -p out
curl -sS "$URL/v1/images/generations" \
  -H "Content-Type: application/json" \
  -d "{\"prompt\": \"$PROMPT\", \"n\": 1, \"seed\": 0, \"zipar_window\": 4}" \
  | python3 -c 'import base64, json, sys; r = json.load(sys.stdin); sys.exit(r["error"]["message"]) if "error" in r else open("out/curl.png", "wb").write(base64.b64decode(r["data"][0]["b64_json"]))'
echo "wrote out/curl.png"
