#!/usr/bin/env bash
# A Ray "cluster" of several nodes on this one machine, for trying `orchestrator submit` and
# multi-node placement without real machines. Each node is a separate raylet with its own CPUs.
#
#   bash cluster/local-multinode.sh start 3      # a head + 2 worker nodes, 1 CPU each
#   .venv/bin/orchestrator submit recipes/rtn-w4g128.yaml --address http://127.0.0.1:8265 --follow
#   bash cluster/local-multinode.sh stop
#
# Binds to 127.0.0.1 only. Token authentication is off for this local trial (RAY_AUTH_MODE=disabled);
# on a shared cluster, leave it on and pass --token / RAY_AUTH_TOKEN to `orchestrator submit`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
TMP=${RAY_TMP:-/tmp/orchestrator-ray}
case "${1:-}" in
  start)
    nodes=${2:-3}
    ray start --head --node-ip-address=127.0.0.1 --port=6380 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
      --num-cpus=1 --temp-dir="$TMP" --include-dashboard=true --disable-usage-stats
    for _ in $(seq 2 "$nodes"); do
      ray start --address=127.0.0.1:6380 --node-ip-address=127.0.0.1 --num-cpus=1
    done
    ray status --address=127.0.0.1:6380 | sed -n '1,20p'
    ;;
  stop)
    ray stop
    ;;
  *)
    echo "usage: $0 start [NODES] | stop" >&2
    exit 2
    ;;
esac
