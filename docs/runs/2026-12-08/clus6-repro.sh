#!/bin/bash
# the cluster's first test under CPU load, N times
cd /work/wt/suite5
for i in $(seq 1 ${N:-3}); do
  pids=""
  for k in 1 2 3; do timeout 400 python3 -c "while 1: pass" & pids="$pids $!"; done
  echo "== run $i $(date +%T) $(uptime)"
  timeout 600 .venv/bin/python -m pytest -q -x tests/cluster/test_cluster.py -k reach_instances -p no:cacheprovider 2>&1 | tail -120
  kill $pids 2>/dev/null
done
