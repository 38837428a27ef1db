#!/bin/bash
# quiet measurements of the merged tree (integ) against e7cc91e, with A/A runs from dups (at e7cc91e)
B=${1:-e7cc91e}; L=/work/wt/logs/quiet14.log
unset PYTHONDONTWRITEBYTECODE
run() { echo "=== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) :: $1 :: $2" >> $L; (cd $1 && timeout 900 .venv/bin/python $2 >> $L 2>&1); echo "=== end $(date +%T) rc=$?" >> $L; }
for i in 1 2 3; do run /work/wt/integ "benchmarks/cold_start.py --quick --rev $B"; done
run /work/wt/dups "benchmarks/cold_start.py --quick --rev $B"
run /work/wt/integ "benchmarks/gateway_overhead.py --quick --rev $B"
run /work/wt/integ "benchmarks/gateway_overhead.py --quick --rev $B"
run /work/wt/dups "benchmarks/gateway_overhead.py --quick --rev $B"
run /work/wt/dups "benchmarks/cold_start.py --quick --rev $B"
for i in 1 2; do run /work/wt/integ "benchmarks/hop_latency.py --quick"; done
echo "=== all done $(date +%T)" >> $L
