#!/usr/bin/env bash
# Screenshot of TensorBoard's custom-scalars layout over a real run, with headless Chromium.
# Usage: scripts/tensorboard_screenshot.sh RUN_DIR OUT.png [PAGE]   (PAGE: custom_scalars, hparams)
# Needs `chromium` (Debian: apt-get install chromium fonts-noto-cjk). Serves on 127.0.0.1 only.
set -euo pipefail
run=$1; out=$2; page=${3:-custom_scalars}
py=${PYTHON:-python3}
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$py -m tensorboard.main --logdir "$run/tensorboard" --host 127.0.0.1 --port "$port" \
    --load_fast=false >/dev/null 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/data/plugins_listing" >/dev/null && break; sleep 0.5
done
sleep 5  # the first load of the logdir
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1150 \
    --virtual-time-budget=20000 --screenshot="$out" "http://127.0.0.1:$port/#$page" 2>/dev/null
echo "wrote $out"
