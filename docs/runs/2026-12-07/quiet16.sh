#!/bin/bash
# quiet measurements of the merged tree (integ) against B (default 53b1b94 = main at the stop's
# start), with A/A runs from /work/wt/dups (detached at B): the tree against itself
B=${1:-53b1b94}; L=${2:-/work/wt/logs16/quiet16.log}
unset PYTHONDONTWRITEBYTECODE
run() { echo "=== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) :: $1 :: $2" >> $L; (cd $1 && timeout 900 .venv/bin/python $2 >> $L 2>&1); echo "=== end $(date +%T) rc=$?" >> $L; }
for i in 1 2 3; do run /work/wt/integ "benchmarks/cold_start.py --quick --rev $B"; done
run /work/wt/dups "benchmarks/cold_start.py --quick --rev $B"
run /work/wt/integ "benchmarks/gateway_overhead.py --quick --rev $B"
run /work/wt/dups "benchmarks/gateway_overhead.py --quick --rev $B"
run /work/wt/integ "benchmarks/cold_start.py --quick --rev $B"
run /work/wt/dups "benchmarks/cold_start.py --quick --rev $B"
run /work/wt/integ "benchmarks/hop_latency.py --quick"
run /work/wt/integ "benchmarks/instance_cpu.py --quick --rev 2f92010"
echo "=== all done $(date +%T)" >> $L
