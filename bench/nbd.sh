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
#   BENCH_SMALL_WINDOW=64K  activity window of the extra "small window" volrep; off: no such rows
#   BENCH_SMALL_REGION=4K   region size of that volrep's volume
#
# In a temporary directory: sparse 1 GiB files, one served by `nbdkit file`, one created with
# `volrep create` and served by `volrep primary` (defaults: 64 KiB regions, 1 GiB activity window),
# all on 127.0.0.1. Every file is warmed with one sequential write pass, then each row runs
# alternately against the servers (order reversed on every repeat).
#
# volrep runs with --http; around every fio run the bench reads GET /metrics and reports, for rows
# that write, log syncs (group commits) and log records per NBD write over that run. With the
# defaults the warm-up covers the whole volume, so warm writes need no log record at all. To show
# group commit, the rows that write also run against a third server, "volrep-small":
# `volrep primary --activity-window $BENCH_SMALL_WINDOW` on a volume created with
# `--region-size $BENCH_SMALL_REGION`. The small region size matters: with no secondary every
# written region stays dirty and pinned in the window, and only a checkpoint (once more than
# window + 65536 regions are pinned) unpins them; a 1 GiB volume of 64 KiB regions has 16384, so
# there the window size would change nothing. With 4 KiB regions (262144) checkpoints do happen
# and most random writes need a record. Its rows reuse the nbdkit figures of the same row. If
# `volrep primary` has no --activity-window, those rows are skipped with a note.
#
# Needs fio with the nbd engine and nbdkit (Debian: fio nbdkit).
#
# Exit status: 0 when everything ran, 1 when something failed to run (a server did not start or
# died, fio failed or did no I/O). Ratios are reported, never asserted.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$ROOT/bench/fio.mjs"
RUNTIME=${BENCH_RUNTIME:-4}
REPEATS=${BENCH_REPEATS:-3}
SMALL_WINDOW=${BENCH_SMALL_WINDOW:-64K}
SMALL_REGION=${BENCH_SMALL_REGION:-4K}
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
[[ $SMALL_WINDOW == off || $SMALL_WINDOW =~ ^[1-9][0-9]*[KMGT]?$ ]] ||
  die "BENCH_SMALL_WINDOW must be a size (64K) or off, got '$SMALL_WINDOW'"
[[ $SMALL_REGION =~ ^[1-9][0-9]*[KMGT]?$ ]] || die "BENCH_SMALL_REGION must be a size (4K), got '$SMALL_REGION'"

# The small-window server needs `volrep primary --activity-window`.
SMALL=0
SMALL_NOTE=
if [[ $SMALL_WINDOW == off ]]; then
  SMALL_NOTE="small-window rows skipped (BENCH_SMALL_WINDOW=off)"
elif node "$ROOT/bin/volrep.js" primary --help 2>/dev/null | grep -q -- '--activity-window'; then
  SMALL=1
else
  SMALL_NOTE="small-window rows skipped: this volrep primary has no --activity-window option"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/volrep-bench.XXXXXX")
NBDKIT_PID=
VOLREP_PID=
SMALL_PID=

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
  if [[ -n $SMALL_PID ]]; then stop_pid "$SMALL_PID" || true; fi
  if [[ -n $NBDKIT_PID ]]; then stop_pid "$NBDKIT_PID" || true; fi
  if ((rc != 0)); then
    for log in "$WORK"/volrep.log "$WORK"/volrep-small.log "$WORK"/nbdkit.log "$WORK"/last-fio.log; do
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

STARTED_PID=
start_volrep() { # name nbd-port http-port [create-args...] -- [primary-args...]: sets STARTED_PID
  local name=$1 port=$2 http=$3 create=() primary=()
  shift 3
  while (($# > 0)) && [[ $1 != -- ]]; do
    create+=("$1")
    shift
  done
  (($# > 0)) && shift
  primary=("$@")
  node "$ROOT/bin/volrep.js" create --volume "$WORK/$name.img" --size "$SIZE" "${create[@]}" \
    >"$WORK/create-$name.log" 2>&1 || die "volrep create failed ($name): $(cat "$WORK/create-$name.log")"
  node "$ROOT/bin/volrep.js" primary --volume "$WORK/$name.img" --nbd "127.0.0.1:$port" \
    --http "127.0.0.1:$http" "${primary[@]}" 2>"$WORK/$name.log" &
  STARTED_PID=$!
  wait_ready "$name" "$STARTED_PID" grep -q '"primary serving"' "$WORK/$name.log"
}

VOLREP_PORT=$(node "$HELPER" port)
VOLREP_HTTP=$(node "$HELPER" port)
start_volrep volrep "$VOLREP_PORT" "$VOLREP_HTTP"
VOLREP_PID=$STARTED_PID
SERVERS=(volrep nbdkit)
if ((SMALL)); then
  SMALL_PORT=$(node "$HELPER" port)
  SMALL_HTTP=$(node "$HELPER" port)
  start_volrep volrep-small "$SMALL_PORT" "$SMALL_HTTP" --region-size "$SMALL_REGION" -- \
    --activity-window "$SMALL_WINDOW"
  SMALL_PID=$STARTED_PID
  SERVERS=(volrep volrep-small nbdkit)
fi

uri_of() { # server
  case $1 in
  nbdkit) echo "nbd://127.0.0.1:$NBDKIT_PORT/" ;;
  volrep) echo "nbd://127.0.0.1:$VOLREP_PORT/volrep" ;;
  volrep-small) echo "nbd://127.0.0.1:$SMALL_PORT/volrep" ;;
  esac
}
pid_of() {
  case $1 in
  nbdkit) echo "$NBDKIT_PID" ;;
  volrep) echo "$VOLREP_PID" ;;
  volrep-small) echo "$SMALL_PID" ;;
  esac
}
log_counters() { # server: "writes log_syncs log_records bitmap_persists volume_syncs" since start
  local http
  case $1 in
  nbdkit)
    echo '- - - - -'
    return
    ;;
  volrep) http=$VOLREP_HTTP ;;
  volrep-small) http=$SMALL_HTTP ;;
  esac
  node "$HELPER" metrics "127.0.0.1:$http"
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
say "  nbdkit (file plugin) on 127.0.0.1:$NBDKIT_PORT, volrep primary on 127.0.0.1:$VOLREP_PORT (metrics :$VOLREP_HTTP)"
if ((SMALL)); then
  say "  volrep-small: primary --activity-window $SMALL_WINDOW, volume --region-size $SMALL_REGION," \
    "on 127.0.0.1:$SMALL_PORT (metrics :$SMALL_HTTP), rows that write only"
else
  say "  note: $SMALL_NOTE"
fi

# --- warm-up: one sequential write pass over each whole file -------------------------------------
for server in "${SERVERS[@]}"; do
  run_fio "$server" "$WORK/warm-$server.json" --rw=write --bs=1M --iodepth=8
  read -r _ bw _ < <(node "$HELPER" parse "$WORK/warm-$server.json") || die "bad fio output (warm-up $server)"
  say "  warm-up $server: $((bw / 1000000)) MB/s"
done

# --- measurement ----------------------------------------------------------------------------------
SAMPLES="$WORK/samples.tsv"
: >"$SAMPLES"
for ((rep = 1; rep <= REPEATS; rep++)); do
  order=("${SERVERS[@]}")
  if ((rep % 2 == 0)); then
    order=()
    for ((i = ${#SERVERS[@]} - 1; i >= 0; i--)); do order+=("${SERVERS[i]}"); done
  fi
  for ((r = 0; r < ${#ROWS[@]}; r++)); do
    read -r row rw bs qd <<<"${ROWS[r]}"
    # Same offsets for every server within a repeat, new ones for every row and repeat: by default
    # fio replays one sequence in every run, rewriting regions the previous run just logged (fio
    # 3.33 ignores --randseed unless --randrepeat=0).
    seed=$((rep * 1000 + r + 1))
    for server in "${order[@]}"; do
      # The small-window server only runs the rows that write.
      if [[ $server == volrep-small && $rw != *write* ]]; then continue; fi
      out="$WORK/$row-$server-$rep.json"
      pid=$(pid_of "$server")
      m0=$(log_counters "$server") || die "cannot read /metrics of $server"
      t0=$(date +%s%N)
      c0=$(cpu_ticks "$pid")
      run_fio "$server" "$out" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --randrepeat=0 --randseed="$seed" \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
      c1=$(cpu_ticks "$pid")
      t1=$(date +%s%N)
      m1=$(log_counters "$server") || die "cannot read /metrics of $server"
      # Server CPU over the whole fio run (ramp and connection setup included), 100 = one core.
      cpu=$(((c1 - c0) * 100 * 1000000000 / CLK_TCK / (t1 - t0)))
      read -r iops bw lat < <(node "$HELPER" parse "$out") || die "bad fio output ($row $server)"
      # Log counter deltas over the same fio run (ramp included): writes syncs records bitmap vsyncs.
      read -r -a a <<<"$m0"
      read -r -a b <<<"$m1"
      deltas=(- - - - -)
      logtext=
      if [[ ${a[0]} != - ]]; then
        for i in 0 1 2 3 4; do deltas[i]=$((b[i] - a[i])); done
        if ((deltas[0] > 0)); then
          logtext=$(awk -v w="${deltas[0]}" -v s="${deltas[1]}" -v r="${deltas[2]}" \
            'BEGIN { printf "  log %.3f syncs/write %.3f records/write", s / w, r / w }')
        fi
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$server" "$rep" "$iops" "$bw" "$lat" "$cpu" \
        "$(IFS=$'\t' && echo "${deltas[*]}")" >>"$SAMPLES"
      if [[ $bs == 1M ]]; then value="$((bw / 1000000)) MB/s"; else value="${iops%.*} IOPS"; fi
      printf '  [%d/%d] %-18s %-12s %12s  clat %8s µs  server CPU %3d%%%s\n' \
        "$rep" "$REPEATS" "$row" "$server" "$value" "$lat" "$cpu" "$logtext"
    done
  done
done

# --- shut down and report -------------------------------------------------------------------------
pid=$VOLREP_PID
VOLREP_PID=
stop_pid "$pid" || die "volrep primary did not stop cleanly (exit status $?)"
if [[ -n $SMALL_PID ]]; then
  pid=$SMALL_PID
  SMALL_PID=
  stop_pid "$pid" || die "volrep primary (small window) did not stop cleanly (exit status $?)"
fi
pid=$NBDKIT_PID
NBDKIT_PID=
stop_pid "$pid" || true # nbdkit exits with a signal status on SIGTERM; that is fine
for name in volrep volrep-small; do
  [[ -f $WORK/$name.log ]] || continue
  errors=$(grep -c '"level":[56]0' "$WORK/$name.log" || true)
  if ((errors > 0)); then
    say "warning: $name logged $errors error line(s), e.g.:"
    grep -m 3 '"level":[56]0' "$WORK/$name.log"
  fi
done

say ""
say "medians of $REPEATS run(s), fio --ioengine=nbd --size=$SIZE --time_based --runtime=$RUNTIME --ramp_time=$RAMP:"
small_env=()
if ((SMALL)); then small_env=(BENCH_SMALL_WINDOW="$SMALL_WINDOW" BENCH_SMALL_REGION="$SMALL_REGION"); fi
env BENCH_RUNTIME="$RUNTIME" BENCH_REPEATS="$REPEATS" BENCH_FIO_VERSION="$(fio --version)" \
  BENCH_NBDKIT_VERSION="$(nbdkit --version | head -n 1)" "${small_env[@]}" \
  node "$HELPER" report "$SAMPLES" "$RESULT_JSON"
say "log syncs/records per write: volrep /metrics deltas over each whole fio run (ramp included),"
say "  summed over the repeats (- : the row does not write)"
if ((SMALL)); then
  say "\"window $SMALL_WINDOW/$SMALL_REGION regions\" rows: volrep primary --activity-window $SMALL_WINDOW on a volume" \
    "of $SMALL_REGION regions, against the same nbdkit runs"
else
  say "note: $SMALL_NOTE"
fi
say ""
say "JSON: $RESULT_JSON"
