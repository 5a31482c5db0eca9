#!/usr/bin/env bash
# Resident memory of a replicating pair on the largest volume ext4 allows (15 TiB, sparse): at
# start-up, idle, under 4 KiB random writes at QD32 and under 1 MiB writes at QD8 (which fill the
# in-flight window), against the budget of 100 MiB + one bit per region + the window.
#
# Usage:  npm run build && bash bench/memory.sh
# Environment:
#   MEM_SIZE=15T        volume size (both files are sparse)
#   MEM_SECONDS=8       seconds of each load (RSS sampled every 100 ms; the figure is the peak)
#   MEM_NODE_FLAGS=     extra node flags for both daemons (say --max-semi-space-size=4)
# Needs fio with the nbd engine (Debian: fio). Exit status 1 when something failed to run; the
# budget is reported, never asserted.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$ROOT/bench/fio.mjs"
VOLREP="$ROOT/bin/volrep.js"
SIZE=${MEM_SIZE:-15T}
SECONDS_LOAD=${MEM_SECONDS:-8}
FLAGS=${MEM_NODE_FLAGS:-}
WINDOW_MIB=64 # volrep primary's default --window

die() {
  printf 'memory bench: %s\n' "$*" >&2
  exit 1
}
command -v fio >/dev/null || die "needs fio (Debian: fio)"
[[ -e $ROOT/dist/cli/main.js ]] || die "no build in dist/: run npm run build first"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/volrep-memory-XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

node "$VOLREP" create --volume "$WORK/p.img" --size "$SIZE" >/dev/null || die "volrep create failed"
id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).volumeId)' \
  "$WORK/p.img.volrep/meta.json")
node "$VOLREP" create --volume "$WORK/s.img" --size "$SIZE" --secondary-of "$id" >/dev/null ||
  die "volrep create (secondary) failed"
LISTEN=$(node "$HELPER" port)
NBD=$(node "$HELPER" port)
HTTP=$(node "$HELPER" port)
# shellcheck disable=SC2086 # FLAGS is a list of flags
node $FLAGS "$VOLREP" secondary --volume "$WORK/s.img" --listen "127.0.0.1:$LISTEN" \
  --allow-peer "$(node "$VOLREP" identity --volume "$WORK/p.img")" 2>"$WORK/s.log" &
SECONDARY=$!
PIDS+=("$SECONDARY")
# shellcheck disable=SC2086
node $FLAGS "$VOLREP" primary --volume "$WORK/p.img" --nbd "127.0.0.1:$NBD" --http "127.0.0.1:$HTTP" \
  --peer "127.0.0.1:$LISTEN" --peer-fingerprint "$(node "$VOLREP" identity --volume "$WORK/s.img")" \
  --assume-clean 2>"$WORK/p.log" &
PRIMARY=$!
PIDS+=("$PRIMARY")

rss_mib() { awk '/^VmRSS:/ { print int($2 / 1024) }' "/proc/$1/status" 2>/dev/null || echo 0; }
peak() { # seconds: the peak RSS (MiB) of the primary and of the secondary over that time
  local pm=0 sm=0 p s i
  for ((i = 0; i < $1 * 10; i++)); do
    kill -0 "$PRIMARY" 2>/dev/null || die "the primary died: $(tail -n 3 "$WORK/p.log")"
    kill -0 "$SECONDARY" 2>/dev/null || die "the secondary died: $(tail -n 3 "$WORK/s.log")"
    p=$(rss_mib "$PRIMARY")
    s=$(rss_mib "$SECONDARY")
    ((p > pm)) && pm=$p
    ((s > sm)) && sm=$s
    sleep 0.1
  done
  echo "$pm $sm"
}
load() { # fio-args...: peak RSS while fio runs them (after its first second)
  local pid
  fio --name=mem --ioengine=nbd --uri="nbd://127.0.0.1:$NBD/volrep" --size=1G --time_based \
    --runtime=$((SECONDS_LOAD + 1)) "$@" >"$WORK/fio.txt" 2>&1 &
  pid=$!
  sleep 1
  peak "$SECONDS_LOAD"
  wait "$pid" || die "fio failed: $(tail -n 5 "$WORK/fio.txt")"
}

read -r start_p start_s < <(peak 4)
node "$HELPER" insync "127.0.0.1:$HTTP" 60 >/dev/null || die "the pair did not get in sync"
bytes=$(node "$HELPER" status "127.0.0.1:$HTTP" volume.size) || die "cannot read /status"
region_size=$(node "$HELPER" status "127.0.0.1:$HTTP" volume.regionSize) || die "cannot read /status"
regions=$(node -e 'console.log(Math.ceil(Number(process.argv[1]) / Number(process.argv[2])))' "$bytes" "$region_size")
read -r idle_p idle_s < <(peak 2)
read -r w4k_p w4k_s < <(load --rw=randwrite --bs=4k --iodepth=32)
read -r w1m_p w1m_s < <(load --rw=write --bs=1M --iodepth=8)

bitmap_mib=$(((regions + 8 * 1048576 - 1) / (8 * 1048576)))
budget=$((100 + bitmap_mib + WINDOW_MIB))
bitmap="$regions regions, a $bitmap_mib MiB bitmap"
printf '\nRSS of a %s pair (%s; window %d MiB; node flags: %s), peak MiB:\n' "$SIZE" "$bitmap" \
  "$WINDOW_MIB" "${FLAGS:-none}"
printf '| %-26s | %7s | %9s | %6s |\n' state primary secondary budget
printf '|:%s|%s:|%s:|%s:|\n' "---------------------------" "--------" "----------" "-------"
printf '| %-26s | %7s | %9s | %6s |\n' "start-up (first 4 s)" "$start_p" "$start_s" "$budget" \
  idle "$idle_p" "$idle_s" "$budget" "4 KiB randwrite QD32" "$w4k_p" "$w4k_s" "$budget" \
  "1 MiB write QD8" "$w1m_p" "$w1m_s" "$budget"
