#!/usr/bin/env bash
# Sets up ekko and runs the main job: the ML loop on built-in data. A seeded
# click stream trains a DLRM-style recommender online (tables through ekko's
# fused kernels, the dense MLP in torch) while 2 live serving replicas predict
# every event first; prints the replicas' log-loss/AUC beside the trainer's,
# row and dense freshness, the quality health checks, and that after a flush
# the replicas predict exactly what the trainer does.
# Arguments go to examples/online_clicks.py (try --help); `ekko run
# examples/dlrm.ekko` runs the 26-table DLRM's update stream instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec "$PY" examples/online_clicks.py "$@"
