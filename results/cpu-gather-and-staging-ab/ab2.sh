#!/bin/bash
# usage: ab2.sh ROUNDS DTYPE MODE ITERS [SHAPE] -- alternates base (c36219c) and main, 1 thread
HERE=$(cd "$(dirname "$0")" && pwd)
R=$1; DT=$2; MODE=$3; IT=$4; export SHAPE=${5:-"(2, 256, 44, 44, 5, 1, 2)"}
for r in $(seq $R); do
  for v in base new; do
    case $v in base) P=${BASE:?checkout of the old build};; new) P=${NEW:-.};; esac
    echo "$v $(cd /tmp && PYTHONPATH=$P ${PYTHON:-python} "$HERE/loop.py" $DT $MODE $IT 2>/dev/null)"
  done
done
