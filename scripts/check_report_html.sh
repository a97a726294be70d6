#!/usr/bin/env bash
# Render a pkt report in headless Chromium (Debian package `chromium`) and save a screenshot, to check that
# the self-contained HTML page opens and shows its figures. Usage: scripts/check_report_html.sh RUN_DIR [OUT.png]
set -euo pipefail
run=$(cd "$1" && pwd); out=${2:-$run/report-screenshot.png}
profile=$(mktemp -d); trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --window-size=1200,2400 \
  --screenshot="$out" "file://$run/report.html" 2>/dev/null
n=$(chromium --headless --no-sandbox --disable-gpu --disable-background-networking --user-data-dir="$profile" \
  --dump-dom "file://$run/report.html" 2>/dev/null | grep -o '<img' | wc -l)
echo "rendered $run/report.html: $n embedded figures, screenshot $out"
[ "$n" -ge 1 ]
