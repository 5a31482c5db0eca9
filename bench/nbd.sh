#!/usr/bin/env bash
# NBD throughput of volrep vs nbdkit's file plugin, same fio jobs, same kind of file.
#
# Usage:  npm run bench                      (builds, then runs this script)
#         bash bench/nbd.sh                  (needs a build in dist/)
# Environment:
#   BENCH_RUNTIME=4   seconds measured per fio run (after a 1 s ramp)
#   BENCH_REPEATS=3   runs per row and server; the table shows medians
#   BENCH_JSON=PATH   where to write the JSON results
#                     (default: ${TMPDIR:-/tmp}/volrep-bench-nbd-<timestamp>.json; the work dir is removed)
#
# In a temporary directory: two sparse 1 GiB files, one served by `nbdkit file`, one created with
# `volrep create` and served by `volrep primary`, both on 127.0.0.1. Both are warmed with one
# sequential write pass, then each row runs alternately against both servers (order swapped on
# every repeat). Needs fio with the nbd engine and nbdkit (Debian: fio nbdkit).
#
# Exit status: 0 when everything ran, 1 when something failed to run (a server did not start or
# died, fio failed or did no I/O). Ratios are reported, never asserted.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$ROOT/bench/fio.mjs"
RUNTIME=${BENCH_RUNTIME:-4}
REPEATS=${BENCH_REPEATS:-3}
RAMP=1
SIZE=1G
STAMP=$(date +%Y%m%dT%H%M%S)
RESULT_JSON=${BENCH_JSON:-${TMPDIR:-/tmp}/volrep-bench-nbd-$STAMP.json}

# row name, fio rw, block size, queue depth
ROWS=(
  "randwrite-4k-qd32 randwrite 4k 32"
  "randwrite-4k-qd1 randwrite 4k 1"
  "write-1m-qd8 write 1M 8"
  "randread-4k-qd32 randread 4k 32"
)

say() { printf '%s\n' "$*"; }
die() {
  printf 'bench: %s\n' "$*" >&2
  exit 1
}

[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME must be a positive integer (seconds), got '$RUNTIME'"
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPEATS must be a positive integer, got '$REPEATS'"
for tool in fio nbdkit node; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install fio nbdkit)"
done
fio --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine (fio --enghelp=nbd)"
nbdkit file --dump-plugin >/dev/null 2>&1 || die "nbdkit has no file plugin"
[[ -f $ROOT/dist/cli/main.js ]] || die "no build in $ROOT/dist: run npm run build (npm run bench does)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/volrep-bench.XXXXXX")
NBDKIT_PID=
VOLREP_PID=

stop_pid() { # pid: SIGTERM, wait up to 10 s, then SIGKILL; prints nothing, returns the exit status
  local pid=$1 i rc=0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $VOLREP_PID ]]; then stop_pid "$VOLREP_PID" || true; fi
  if [[ -n $NBDKIT_PID ]]; then stop_pid "$NBDKIT_PID" || true; fi
  if ((rc != 0)); then
    for log in "$WORK"/volrep.log "$WORK"/nbdkit.log "$WORK"/last-fio.log; do
      [[ -s $log ]] || continue
      printf '\n--- last lines of %s ---\n' "$(basename "$log")" >&2
      tail -n 15 "$log" >&2
    done
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_ready() { # name pid test-command...: polls for up to 15 s while the server stays alive
  local name=$1 pid=$2 i
  shift 2
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup"
    if "$@"; then return 0; fi
    sleep 0.1
  done
  die "$name not ready after 15 s"
}

cpu_ticks() { # pid: user+system clock ticks of the whole process (all threads)
  local f
  read -r -a f < <(sed 's/^.*) //' "/proc/$1/stat")
  echo $((f[11] + f[12]))
}
CLK_TCK=$(getconf CLK_TCK)

# --- servers --------------------------------------------------------------------------------------
truncate -s "$SIZE" "$WORK/nbdkit.img"
NBDKIT_PORT=$(node "$HELPER" port)
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$NBDKIT_PORT" -P "$WORK/nbdkit.pid" \
  file "$WORK/nbdkit.img" >"$WORK/nbdkit.log" 2>&1 &
NBDKIT_PID=$!
wait_ready nbdkit "$NBDKIT_PID" test -s "$WORK/nbdkit.pid"

node "$ROOT/bin/volrep.js" create --volume "$WORK/volrep.img" --size "$SIZE" >"$WORK/create.log" 2>&1 ||
  die "volrep create failed: $(cat "$WORK/create.log")"
VOLREP_PORT=$(node "$HELPER" port)
node "$ROOT/bin/volrep.js" primary --volume "$WORK/volrep.img" --nbd "127.0.0.1:$VOLREP_PORT" \
  2>"$WORK/volrep.log" &
VOLREP_PID=$!
wait_ready volrep "$VOLREP_PID" grep -q '"primary serving"' "$WORK/volrep.log"

uri_of() { # server
  case $1 in
  nbdkit) echo "nbd://127.0.0.1:$NBDKIT_PORT/" ;;
  volrep) echo "nbd://127.0.0.1:$VOLREP_PORT/volrep" ;;
  esac
}
pid_of() {
  case $1 in
  nbdkit) echo "$NBDKIT_PID" ;;
  volrep) echo "$VOLREP_PID" ;;
  esac
}

run_fio() { # server out.json fio-args...: runs one fio job against the server
  local server=$1 out=$2
  shift 2
  if ! fio --name=bench --ioengine=nbd --uri="$(uri_of "$server")" --size="$SIZE" \
    --output-format=json --output="$out" "$@" >"$WORK/last-fio.log" 2>&1; then
    die "fio failed against $server: fio $*"
  fi
  kill -0 "$(pid_of "$server")" 2>/dev/null || die "$server died during fio $*"
}

say "volrep NBD bench: ${RUNTIME}s + ${RAMP}s ramp per run, $REPEATS repeat(s), sparse $SIZE files in $WORK"
say "  $(fio --version), $(nbdkit --version | head -n 1), node $(node --version)"
say "  nbdkit (file plugin) on 127.0.0.1:$NBDKIT_PORT, volrep primary on 127.0.0.1:$VOLREP_PORT"

# --- warm-up: one sequential write pass over each whole file -------------------------------------
for server in volrep nbdkit; do
  run_fio "$server" "$WORK/warm-$server.json" --rw=write --bs=1M --iodepth=8
  read -r _ bw _ < <(node "$HELPER" parse "$WORK/warm-$server.json") || die "bad fio output (warm-up $server)"
  say "  warm-up $server: $((bw / 1000000)) MB/s"
done

# --- measurement ----------------------------------------------------------------------------------
SAMPLES="$WORK/samples.tsv"
: >"$SAMPLES"
for ((rep = 1; rep <= REPEATS; rep++)); do
  if ((rep % 2)); then order="volrep nbdkit"; else order="nbdkit volrep"; fi
  for spec in "${ROWS[@]}"; do
    read -r row rw bs qd <<<"$spec"
    for server in $order; do
      out="$WORK/$row-$server-$rep.json"
      pid=$(pid_of "$server")
      t0=$(date +%s%N)
      c0=$(cpu_ticks "$pid")
      run_fio "$server" "$out" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
      c1=$(cpu_ticks "$pid")
      t1=$(date +%s%N)
      # Server CPU over the whole fio run (ramp and connection setup included), 100 = one core.
      cpu=$(((c1 - c0) * 100 * 1000000000 / CLK_TCK / (t1 - t0)))
      read -r iops bw lat < <(node "$HELPER" parse "$out") || die "bad fio output ($row $server)"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$server" "$rep" "$iops" "$bw" "$lat" "$cpu" >>"$SAMPLES"
      if [[ $bs == 1M ]]; then value="$((bw / 1000000)) MB/s"; else value="${iops%.*} IOPS"; fi
      printf '  [%d/%d] %-18s %-6s %12s  clat %8s µs  server CPU %3d%%\n' \
        "$rep" "$REPEATS" "$row" "$server" "$value" "$lat" "$cpu"
    done
  done
done

# --- shut down and report -------------------------------------------------------------------------
pid=$VOLREP_PID
VOLREP_PID=
stop_pid "$pid" || die "volrep primary did not stop cleanly (exit status $?)"
pid=$NBDKIT_PID
NBDKIT_PID=
stop_pid "$pid" || true # nbdkit exits with a signal status on SIGTERM; that is fine
errors=$(grep -c '"level":[56]0' "$WORK/volrep.log" || true)
if ((errors > 0)); then
  say "warning: volrep logged $errors error line(s), e.g.:"
  grep -m 3 '"level":[56]0' "$WORK/volrep.log"
fi

say ""
say "medians of $REPEATS run(s), fio --ioengine=nbd --size=$SIZE --time_based --runtime=$RUNTIME --ramp_time=$RAMP:"
BENCH_RUNTIME=$RUNTIME BENCH_REPEATS=$REPEATS BENCH_FIO_VERSION=$(fio --version) \
  BENCH_NBDKIT_VERSION=$(nbdkit --version | head -n 1) \
  node "$HELPER" report "$SAMPLES" "$RESULT_JSON"
say ""
say "JSON: $RESULT_JSON"
