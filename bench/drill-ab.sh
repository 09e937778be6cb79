#!/bin/bash
# Failover drills of two builds taking turns, for an A/B of the failover
# time that one machine's noise cannot fake: `understudyctl demo` of build A,
# then of build B, N times, each drill's "failover time" appended to OUT as
# "i a|b rc=… failover=…". A drill over 170 ms (or one that failed) keeps its
# directory and debug logs (OUT.dirs/a17, …); the rest are removed.
#
#   bench/drill-ab.sh A_BIN_DIR B_BIN_DIR N OUT [stress]
#
# A_BIN_DIR and B_BIN_DIR each hold an understudyctl and understudyd (copy
# target/release's before and after a change). With "stress", stress-ng's
# disk writer runs beside the drills (fsync tails of up to ~1 s here).
set -u
a=$1 b=$2 n=$3 out=$4 load=${5:-}
dirs=$out.dirs
mkdir -p "$dirs"
if [ "$load" = stress ]; then
    stress-ng --hdd 1 --hdd-bytes 512M --temp-path "$dirs" --timeout 0 > /dev/null 2>&1 &
    stress=$!
    trap 'kill $stress 2>/dev/null' EXIT
fi
for i in $(seq 1 "$n"); do
    for v in a b; do
        bin=$a
        [ $v = b ] && bin=$b
        d=$dirs/$v$i
        rm -rf "$d"
        UNDERSTUDY_PAIR_LOG=debug,h2=info,hyper=info,tower=info \
            "$bin/understudyctl" demo --dir "$d" > "$d.out" 2>&1
        rc=$?
        f=$(awk '/failover time/ {print $3}' "$d.out")
        echo "$i $v rc=$rc failover=$f" >> "$out"
        if [ $rc = 0 ] && [ -n "$f" ] && awk "BEGIN {exit !($f < 170)}"; then
            rm -rf "$d" "$d.out"
        fi
    done
done
for v in a b; do
    awk -v v=$v '$2 == v {sub("failover=", "", $4); print $4}' "$out" | sort -n |
        awk -v v=$v '{x[NR] = $1} END {if (NR) printf "%s: %d drills, p50 %.1f ms, max %.1f ms\n", v, NR, x[int((NR + 1) / 2)], x[NR]}'
done
