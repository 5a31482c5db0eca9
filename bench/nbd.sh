#!/usr/bin/env bash
# NBD throughput of volrep vs nbdkit's file plugin, standalone and replicating, same fio jobs, same
# kind of file; then the resync of a replica that missed 1 % of the regions vs rsync of the files.
#
# Usage:  npm run bench                      (builds, then runs this script)
#         npm run bench -- --quick           the same table in about two minutes: 2 s runs, one
#                                            repeat, no small-window rows (noisier; for a quick look)
#         bash bench/nbd.sh [--quick]        (needs a build in dist/)
# Environment:
#   BENCH_RUNTIME=4   seconds measured per fio run (after a 1 s ramp)
#   BENCH_REPEATS=3   runs per row and target; the table shows medians
#   BENCH_JSON=PATH   where to write the JSON results
#                     (default: ${TMPDIR:-/tmp}/volrep-bench-nbd-<timestamp>.json; the work dir is removed)
#   BENCH_SMALL_WINDOW=64K  activity window of the extra "small window" volrep; off: no such rows
#   BENCH_SMALL_REGION=4K   region size of that volrep's volume
#   BENCH_RESYNC_REGIONS=164  regions changed while the secondary is down (1 % of a 1 GiB volume)
#   BENCH_LOAD_RESYNC_REGIONS=8192  regions changed for the resync under a client write load (half the volume)
#
# Targets, all on 127.0.0.1, each on its own sparse 1 GiB file in a temporary directory:
#   nbdkit        (a) `nbdkit file`
#   volrep        (b) `volrep primary` alone (defaults: 64 KiB regions, 1 GiB activity window)
#   volrep-async  (c) `volrep primary --peer --assume-clean` replicating (async) to a local
#                     `volrep secondary`; both volumes freshly created, so no initial sync runs
#   volrep-sync   (d) the same with `--mode sync`
#   volrep-async-plain (f) the async pair of (c) with `--insecure-plaintext` on both sides (the pairs
#                     above use TLS 1.3 with pinned certificates, the default): TLS costs c/f
#   volrep-small      (rows that write only) see below
#   qemu-mirror   (g) a peer that replicates: qemu-storage-daemon exporting its file over NBD with a
#                     blockdev-mirror job in copy-mode write-blocking to a second `nbdkit file` (every
#                     write completes once source and target wrote it; no fsync on the target, no dirty
#                     log). Server CPU: qemu-storage-daemon + that nbdkit. Skipped with a note when
#                     qemu-storage-daemon is missing (Debian: qemu-system-common).
# Every file is warmed with one sequential write pass, then each row runs against the targets in
# turn (order reversed on every repeat). After every run against a pair (and after its warm-up) the
# bench waits until the pair is in sync (primary /status: peer connected, 0 dirty regions, 0 pending
# updates), so that one run's replication backlog does not run into the next; the wait is reported.
# Server CPU of a pair is primary + secondary.
#
# The primaries run with --http; around every fio run the bench reads GET /metrics and reports, for
# rows that write, log syncs (group commits) and log records per NBD write over that run. With the
# defaults the warm-up covers the whole volume, so warm writes need no log record at all. To show
# group commit, the rows that write also run against "volrep-small":
# `volrep primary --activity-window $BENCH_SMALL_WINDOW` on a volume created with
# `--region-size $BENCH_SMALL_REGION`. The small region size matters: with no secondary every
# written region stays dirty and pinned in the window, and only a checkpoint (once more than
# window + 65536 regions are pinned) unpins them; a 1 GiB volume of 64 KiB regions has 16384, so
# there the window size would change nothing. With 4 KiB regions (262144) checkpoints do happen
# and most random writes need a record. If `volrep primary` has no --activity-window, those rows are
# skipped with a note.
#
# Resync vs rsync (after the fio rows, on the async pair, in sync): SIGTERM the secondary, copy its
# file (the replica as it was), write BENCH_RESYNC_REGIONS distinct random 64 KiB regions of random
# bytes through NBD on the primary (then FLUSH), restart the secondary and time until the pair is
# in sync; volrep_resync_bytes_total must grow by regions x 64 KiB. Then time
# `rsync --inplace --no-whole-file --ignore-times --stats primary.img old-copy.img` (all files in
# the page cache; --ignore-times because rsync's quick check compares whole seconds, and the copy
# and the writes to the primary usually fall in the same second: without it rsync skips the file)
# and compare the copies byte for byte. The times count from the restart and from the moment the
# restarted secondary logged that it serves (what a user waits for, less Node's own start-up), to
# the primary's log line for the resync's durable end (then confirmed in sync through /status).
# Then the resync under load: BENCH_LOAD_RESYNC_REGIONS regions change while the secondary is down;
# once the primary has reconnected, fio writes 4 KiB randwrite QD32 to it; the time from the
# reconnect until the replica is consistent again (the resync ended, fio still writing).
# Then a fresh pair: two BENCH_FRESH_SIZE (1T) sparse files made by `volrep create`, 16 regions
# written before the secondary starts: secondary serving → in sync, and the bytes sent. And a full
# sync of a file of random data (adopted by `volrep create`) against `nbdcopy --flush` of it.
#
# Needs fio with the nbd engine, nbdkit and rsync (Debian: fio nbdkit rsync).
#
# Exit status: 0 when everything ran, 1 when something failed to run (a server did not start or
# died, fio failed or did no I/O, a pair did not get in sync, a copy differs). Ratios are
# reported, never asserted.
set -euo pipefail

QUICK=0
for arg in "$@"; do
  case $arg in
  --quick) QUICK=1 ;;
  *)
    printf 'bench: unknown argument %s (usage: bash bench/nbd.sh [--quick])\n' "$arg" >&2
    exit 1
    ;;
  esac
done
if ((QUICK)); then
  : "${BENCH_RUNTIME:=2}" "${BENCH_REPEATS:=1}" "${BENCH_SMALL_WINDOW:=off}"
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$ROOT/bench/fio.mjs"
VOLREP="$ROOT/bin/volrep.js"
RUNTIME=${BENCH_RUNTIME:-4}
REPEATS=${BENCH_REPEATS:-3}
SMALL_WINDOW=${BENCH_SMALL_WINDOW:-64K}
SMALL_REGION=${BENCH_SMALL_REGION:-4K}
RESYNC_REGIONS=${BENCH_RESYNC_REGIONS:-164}
RAMP=1
SIZE=1G
SYNC_TIMEOUT=120 # seconds a pair may take to get in sync before the bench gives up
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
[[ $RESYNC_REGIONS =~ ^[1-9][0-9]*$ ]] ||
  die "BENCH_RESYNC_REGIONS must be a positive integer, got '$RESYNC_REGIONS'"
for tool in fio nbdkit node rsync cmp; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install fio nbdkit rsync)"
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
elif node "$VOLREP" primary --help 2>/dev/null | grep -q -- '--activity-window'; then
  SMALL=1
else
  SMALL_NOTE="small-window rows skipped: this volrep primary has no --activity-window option"
fi

BENCH_T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/volrep-bench.XXXXXX")
# Daemons by name: PIDS[name] (unset once stopped), plus their ports.
declare -A PIDS=() NBD_PORT=() HTTP_PORT=() PEER_OF=() LISTEN_PORT=() LINK_FLAGS=()

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

stop_daemon() { # name: stops it, returns its exit status
  local name=$1 pid=${PIDS[$1]:-}
  [[ -n $pid ]] || return 0
  unset "PIDS[$name]"
  stop_pid "$pid"
}

cleanup() {
  local rc=$? name log
  trap - EXIT INT TERM
  # Primaries first, so that they do not log their secondaries' departure as errors.
  for name in "${!PIDS[@]}"; do [[ $name == *-secondary ]] || stop_daemon "$name" || true; done
  for name in "${!PIDS[@]}"; do stop_daemon "$name" || true; done
  if ((rc != 0)); then
    for log in "$WORK"/*.log; do
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

cpu_ticks() { # pid...: user+system clock ticks of the whole processes (all threads), summed
  local f pid sum=0
  for pid in "$@"; do
    read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat")
    sum=$((sum + f[11] + f[12]))
  done
  echo "$sum"
}
CLK_TCK=$(getconf CLK_TCK)
now_ms() { date +%s%3N; }

# --- servers --------------------------------------------------------------------------------------
truncate -s "$SIZE" "$WORK/nbdkit.img"
NBD_PORT[nbdkit]=$(node "$HELPER" port)
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "${NBD_PORT[nbdkit]}" -P "$WORK/nbdkit.pid" \
  file "$WORK/nbdkit.img" >"$WORK/nbdkit.log" 2>&1 &
PIDS[nbdkit]=$!
wait_ready nbdkit "${PIDS[nbdkit]}" test -s "$WORK/nbdkit.pid"

volrep_create() { # name [create-args...]
  local name=$1
  shift
  node "$VOLREP" create --volume "$WORK/$name.img" --size "$SIZE" "$@" >"$WORK/create-$name.log" 2>&1 ||
    die "volrep create failed ($name): $(cat "$WORK/create-$name.log")"
}

start_secondary() { # name: serves $WORK/name.img on LISTEN_PORT[name], HTTP_PORT[name]
  local name=$1
  # A restart starts a new log (the old one is kept as name.N.log, still scanned for errors).
  [[ -e $WORK/$name.log ]] && mv "$WORK/$name.log" "$WORK/$name.$(date +%s%N).log"
  # shellcheck disable=SC2086 # LINK_FLAGS[name] is a list of flags
  node "$VOLREP" secondary --volume "$WORK/$name.img" --listen "127.0.0.1:${LISTEN_PORT[$name]}" \
    --http "127.0.0.1:${HTTP_PORT[$name]}" ${LINK_FLAGS[$name]} 2>"$WORK/$name.log" &
  PIDS[$name]=$!
  wait_ready "$name" "${PIDS[$name]}" grep -q '"secondary serving"' "$WORK/$name.log"
}

start_primary() { # name [primary-args...]
  local name=$1
  shift
  NBD_PORT[$name]=$(node "$HELPER" port)
  HTTP_PORT[$name]=$(node "$HELPER" port)
  node "$VOLREP" primary --volume "$WORK/$name.img" --nbd "127.0.0.1:${NBD_PORT[$name]}" \
    --http "127.0.0.1:${HTTP_PORT[$name]}" "$@" 2>"$WORK/$name.log" &
  PIDS[$name]=$!
  wait_ready "$name" "${PIDS[$name]}" grep -q '"primary serving"' "$WORK/$name.log"
}

identity_of() { # name: the certificate fingerprint of name's node identity
  node "$VOLREP" identity --volume "$WORK/$1.img" || die "volrep identity failed ($1)"
}

start_pair() { # name mode [plain]: fresh primary + replica, secondary "name-secondary", primary --assume-clean
  local name=$1 mode=$2 security=${3:-tls} sec="$1-secondary" id primary_link
  volrep_create "$name"
  id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).volumeId)' \
    "$WORK/$name.img.volrep/meta.json") || die "cannot read the volume id of $name"
  volrep_create "$sec" --secondary-of "$id"
  LISTEN_PORT[$sec]=$(node "$HELPER" port)
  HTTP_PORT[$sec]=$(node "$HELPER" port)
  if [[ $security == plain ]]; then
    LINK_FLAGS[$sec]=--insecure-plaintext
    primary_link=--insecure-plaintext
  else
    LINK_FLAGS[$sec]="--allow-peer $(identity_of "$name")"
    primary_link="--peer-fingerprint $(identity_of "$sec")"
  fi
  start_secondary "$sec"
  PEER_OF[$name]=$sec
  # shellcheck disable=SC2086 # primary_link is a list of flags
  start_primary "$name" --peer "127.0.0.1:${LISTEN_PORT[$sec]}" $primary_link --mode "$mode" --assume-clean
}

wait_insync() { # name: until the pair is in sync; prints "<epoch ms when seen in sync> <ms waited>"
  node "$HELPER" insync "127.0.0.1:${HTTP_PORT[$1]}" "$SYNC_TIMEOUT" ||
    die "$1: the pair did not get in sync within ${SYNC_TIMEOUT}s"
}

# A peer that replicates: QEMU's synchronous mirror (the recipe in ../shared/PERF-NOTES.md).
QEMU=0
QEMU_NOTE=
if command -v qemu-storage-daemon >/dev/null; then
  QEMU=1
  truncate -s "$SIZE" "$WORK/qemu-src.img" "$WORK/qemu-tgt.img"
  NBD_PORT[qemu-mirror-target]=$(node "$HELPER" port)
  nbdkit -f --exit-with-parent -i 127.0.0.1 -p "${NBD_PORT[qemu-mirror-target]}" -P "$WORK/qemu-tgt.pid" \
    file "$WORK/qemu-tgt.img" >"$WORK/qemu-mirror-target.log" 2>&1 &
  PIDS[qemu-mirror-target]=$!
  wait_ready qemu-mirror-target "${PIDS[qemu-mirror-target]}" test -s "$WORK/qemu-tgt.pid"
  NBD_PORT[qemu-mirror]=$(node "$HELPER" port)
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=f0,filename=$WORK/qemu-src.img,cache.direct=off" \
    --blockdev driver=raw,node-name=src,file=f0 \
    --blockdev "driver=nbd,node-name=tgt,server.type=inet,server.host=127.0.0.1,server.port=${NBD_PORT[qemu-mirror-target]}" \
    --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=${NBD_PORT[qemu-mirror]}" \
    --export type=nbd,id=e0,node-name=src,name=src,writable=on \
    --chardev "socket,path=$WORK/qmp.sock,server=on,wait=off,id=q0" --monitor chardev=q0 \
    >"$WORK/qemu-mirror.log" 2>&1 &
  PIDS[qemu-mirror]=$!
  PEER_OF[qemu-mirror]=qemu-mirror-target
  wait_ready qemu-mirror "${PIDS[qemu-mirror]}" test -S "$WORK/qmp.sock"
  node "$HELPER" mirror "$WORK/qmp.sock" || die "the QEMU mirror job did not start"
else
  QEMU_NOTE="QEMU mirror rows skipped: qemu-storage-daemon not found (Debian: qemu-system-common)"
fi

volrep_create volrep
start_primary volrep
start_pair volrep-async async
start_pair volrep-sync sync
start_pair volrep-async-plain async plain
TARGETS=(nbdkit volrep volrep-async volrep-sync volrep-async-plain)
((QEMU)) && TARGETS+=(qemu-mirror)
if ((SMALL)); then
  volrep_create volrep-small --region-size "$SMALL_REGION"
  start_primary volrep-small --activity-window "$SMALL_WINDOW"
  TARGETS+=(volrep-small)
fi
for name in volrep-async volrep-sync volrep-async-plain; do wait_insync "$name" >/dev/null; done

uri_of() { # target
  case $1 in
  nbdkit) echo "nbd://127.0.0.1:${NBD_PORT[nbdkit]}/" ;;
  qemu-mirror) echo "nbd://127.0.0.1:${NBD_PORT[qemu-mirror]}/src" ;;
  *) echo "nbd://127.0.0.1:${NBD_PORT[$1]}/volrep" ;;
  esac
}
is_pair() { # target: a volrep pair (whose backlog the bench drains between runs)
  [[ -n ${PEER_OF[$1]:-} && $1 != qemu-mirror ]]
}
pids_of() { # target: its pid and its secondary's (for the QEMU mirror: its target's)
  local sec=${PEER_OF[$1]:-}
  echo "${PIDS[$1]}" ${sec:+"${PIDS[$sec]}"}
}

log_counters() { # target: "writes log_syncs log_records bitmap_persists volume_syncs" since start
  if [[ $1 == nbdkit || $1 == qemu-mirror ]]; then
    echo '- - - - -'
    return
  fi
  node "$HELPER" metrics "127.0.0.1:${HTTP_PORT[$1]}"
}

run_fio() { # target out.json fio-args...: runs one fio job against the target
  local target=$1 out=$2 pid
  shift 2
  if ! fio --name=bench --ioengine=nbd --uri="$(uri_of "$target")" --size="$SIZE" \
    --output-format=json --output="$out" "$@" >"$WORK/last-fio.txt" 2>&1; then
    cat "$WORK/last-fio.txt" >&2
    die "fio failed against $target: fio $*"
  fi
  for pid in $(pids_of "$target"); do
    kill -0 "$pid" 2>/dev/null || die "$target died during fio $*"
  done
}

say "volrep NBD bench: ${RUNTIME}s + ${RAMP}s ramp per run, $REPEATS repeat(s), sparse $SIZE files in $WORK"
say "  $(fio --version), $(nbdkit --version | head -n 1), $(rsync --version | head -n 1), node $(node --version), $(nproc) CPU(s)"
say "  (a) nbdkit      file plugin on 127.0.0.1:${NBD_PORT[nbdkit]}"
say "  (b) volrep      primary alone on 127.0.0.1:${NBD_PORT[volrep]} (metrics :${HTTP_PORT[volrep]})"
say "  (c) volrep-async primary --peer (async, --assume-clean) on 127.0.0.1:${NBD_PORT[volrep-async]}" \
  "-> secondary :${LISTEN_PORT[volrep-async-secondary]}"
say "  (d) volrep-sync  primary --peer --mode sync (--assume-clean) on 127.0.0.1:${NBD_PORT[volrep-sync]}" \
  "-> secondary :${LISTEN_PORT[volrep-sync-secondary]}"
say "  (f) volrep-async-plain: (c) with --insecure-plaintext on 127.0.0.1:${NBD_PORT[volrep-async-plain]}" \
  "-> secondary :${LISTEN_PORT[volrep-async-plain-secondary]} (c, d: mutual TLS 1.3, pinned fingerprints)"
if ((QEMU)); then
  say "  (g) qemu-mirror  qemu-storage-daemon on 127.0.0.1:${NBD_PORT[qemu-mirror]}, blockdev-mirror write-blocking" \
    "-> nbdkit file :${NBD_PORT[qemu-mirror-target]} ($(qemu-storage-daemon --version | head -n 1))"
else
  say "  note: $QEMU_NOTE"
fi
if ((SMALL)); then
  say "  (e) volrep-small primary --activity-window $SMALL_WINDOW, volume --region-size $SMALL_REGION," \
    "on 127.0.0.1:${NBD_PORT[volrep-small]}, rows that write only"
else
  say "  note: $SMALL_NOTE"
fi

# --- warm-up: one sequential write pass over each whole file -------------------------------------
for target in "${TARGETS[@]}"; do
  t0=$(now_ms)
  run_fio "$target" "$WORK/warm-$target.json" --rw=write --bs=1M --iodepth=8
  read -r _ bw _ < <(node "$HELPER" parse "$WORK/warm-$target.json") || die "bad fio output (warm-up $target)"
  text=
  if is_pair "$target"; then
    read -r t1 _ < <(wait_insync "$target")
    text="; in sync $((t1 - t0)) ms after the start of the pass"
  fi
  say "  warm-up $target: $((bw / 1000000)) MB/s$text"
done

# --- measurement ----------------------------------------------------------------------------------
SAMPLES="$WORK/samples.tsv"
: >"$SAMPLES"
for ((rep = 1; rep <= REPEATS; rep++)); do
  order=("${TARGETS[@]}")
  if ((rep % 2 == 0)); then
    order=()
    for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[i]}"); done
  fi
  for ((r = 0; r < ${#ROWS[@]}; r++)); do
    read -r row rw bs qd <<<"${ROWS[r]}"
    # Same offsets for every target within a repeat, new ones for every row and repeat: by default
    # fio replays one sequence in every run, rewriting regions the previous run just logged (fio
    # 3.33 ignores --randseed unless --randrepeat=0).
    seed=$((rep * 1000 + r + 1))
    for target in "${order[@]}"; do
      # The small-window server only runs the rows that write.
      if [[ $target == volrep-small && $rw != *write* ]]; then continue; fi
      out="$WORK/$row-$target-$rep.json"
      read -r -a pids <<<"$(pids_of "$target")"
      m0=$(log_counters "$target") || die "cannot read /metrics of $target"
      # CPU over the measured part of the run only (after fio's ramp), per daemon: fio runs in the
      # background while the ticks are read once the ramp is over.
      run_fio "$target" "$out" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --randrepeat=0 --randseed="$seed" \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" &
      fio_job=$!
      sleep "$RAMP"
      t0=$(date +%s%N)
      cp0=$(cpu_ticks "${pids[0]}")
      cs0=0
      [[ ${#pids[@]} -lt 2 ]] || cs0=$(cpu_ticks "${pids[1]}")
      wait "$fio_job" || die "fio against $target failed"
      cp1=$(cpu_ticks "${pids[0]}")
      cs1=0
      [[ ${#pids[@]} -lt 2 ]] || cs1=$(cpu_ticks "${pids[1]}")
      t1=$(date +%s%N)
      c0=$((cp0 + cs0))
      c1=$((cp1 + cs1))
      m1=$(log_counters "$target") || die "cannot read /metrics of $target"
      # Drain a pair's backlog before the next run (not part of the measured run).
      wait=-
      if is_pair "$target"; then read -r _ wait < <(wait_insync "$target"); fi
      # Server CPU over the measured run, 100 = one core (primary + secondary for a pair).
      cpu=$(((c1 - c0) * 100 * 1000000000 / CLK_TCK / (t1 - t0)))
      read -r iops bw lat ios < <(node "$HELPER" parse "$out") || die "bad fio output ($row $target)"
      # CPU microseconds over the measured run, primary and secondary apart (for nbdkit: the server).
      us_p=$(((cp1 - cp0) * 1000000 / CLK_TCK))
      us_s=-
      [[ ${#pids[@]} -lt 2 ]] || us_s=$(((cs1 - cs0) * 1000000 / CLK_TCK))
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
      [[ $wait == - ]] || logtext+="  in sync +${wait} ms"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$target" "$rep" "$iops" "$bw" "$lat" "$cpu" \
        "$wait" "$(IFS=$'\t' && echo "${deltas[*]}")" "$ios" "$us_p" "$us_s" >>"$SAMPLES"
      if [[ $bs == 1M ]]; then value="$((bw / 1000000)) MB/s"; else value="${iops%.*} IOPS"; fi
      printf '  [%d/%d] %-18s %-12s %12s  clat %8s µs  server CPU %3d%%%s\n' \
        "$rep" "$REPEATS" "$row" "$target" "$value" "$lat" "$cpu" "$logtext"
    done
  done
done
FIO_SECONDS=$(($(date +%s) - BENCH_T0))

# --- resync vs rsync, on the async pair ----------------------------------------------------------
log_time() { # file message [skip]: the time (ms since the epoch) of the message's first line after `skip` of them
  grep "\"msg\":\"$2\"" "$1" | tail -n +"$((${3:-0} + 1))" | head -n 1 |
    node -e 'let s="";process.stdin.on("data",(d)=>{s+=d}).on("end",()=>{console.log(s?JSON.parse(s).time:"-")})'
}
count_lines() { grep -c "\"msg\":\"$2\"" "$1" || true; } # file message
# The moment a resync ended: the primary's log line for the durable end mark (exact, where polling
# /status from a new process adds its start-up and the poll interval); `wait_insync` confirms it.
CONSISTENT='the replica is consistent'
insync_time() { # primary-name skip polled-time: the end of the resync after `skip` such lines, else the polled time
  local t
  t=$(log_time "$WORK/$1.log" "$CONSISTENT" "$2")
  [[ $t == - ]] && t=$3
  echo "$t"
}
say ""
say "resync vs rsync: volrep-async pair, $RESYNC_REGIONS regions of 64 KiB changed while the secondary is down"
P=volrep-async
S=volrep-async-secondary
PRI_HTTP="127.0.0.1:${HTTP_PORT[$P]}"
wait_insync "$P" >/dev/null
region_size=$(node "$HELPER" status "$PRI_HTTP" volume.regionSize) || die "cannot read /status of $P"
((region_size == 65536)) || die "$P: region size $region_size, expected 65536"
resync0=$(node "$HELPER" counter "$PRI_HTTP" volrep_resync_bytes_total) || die "cannot read /metrics of $P"
rc=0
stop_daemon "$S" || rc=$?
((rc == 0)) || die "volrep secondary did not stop cleanly on SIGTERM (exit status $rc)"
cp --sparse=never "$WORK/$S.img" "$WORK/old-copy.img" # the replica as it was
node "$HELPER" scatter "127.0.0.1:${NBD_PORT[$P]}" volrep "$RESYNC_REGIONS" "$region_size" ||
  die "writing $RESYNC_REGIONS regions through NBD failed"
dirty=$(node "$HELPER" status "$PRI_HTTP" dirtyRegions) || die "cannot read /status of $P"
say "  secondary stopped (SIGTERM), replica copied, $RESYNC_REGIONS random regions written; primary: $dirty dirty regions"
connects0=$(grep -c '"connected to the secondary"' "$WORK/$P.log" || true)
consistent0=$(count_lines "$WORK/$P.log" "$CONSISTENT")
t_restart=$(now_ms)
start_secondary "$S"
t_serving=$(now_ms)
read -r t_polled _ < <(wait_insync "$P")
t_insync=$(insync_time "$P" "$consistent0" "$t_polled")
resync1=$(node "$HELPER" counter "$PRI_HTTP" volrep_resync_bytes_total) || die "cannot read /metrics of $P"
# When the primary reconnected (its log's timestamp, ms since the epoch): the rest is the resync.
t_connected=$(log_time "$WORK/$P.log" 'connected to the secondary' "$connects0")
# When the restarted secondary listened (what a user waits for from there, less Node's start-up).
t_listening=$(log_time "$WORK/$S.log" 'secondary serving')
cmp -s "$WORK/$P.img" "$WORK/$S.img" || die "after the resync the replica differs from the primary volume"
say "  replica identical to the primary after the resync (cmp)"

rsync_t0=$(now_ms)
rsync --inplace --no-whole-file --ignore-times --stats "$WORK/$P.img" "$WORK/old-copy.img" >"$WORK/rsync.txt" 2>&1 ||
  die "rsync failed: $(cat "$WORK/rsync.txt")"
rsync_t1=$(now_ms)
cmp -s "$WORK/$P.img" "$WORK/old-copy.img" || die "after rsync the old copy differs from the primary volume"
say "  old copy identical to the primary after rsync (cmp)"

RESYNC_KV="$WORK/resync.kv"
{
  echo "regions=$RESYNC_REGIONS"
  echo "regionSize=$region_size"
  echo "dirtyBefore=$dirty"
  echo "resyncBytes=$((resync1 - resync0))"
  echo "restartToServingMs=$((t_serving - t_restart))"
  echo "restartToConnectedMs=$([[ $t_connected == - ]] && echo - || echo $((t_connected - t_restart)))"
  echo "restartToInSyncMs=$((t_insync - t_restart))"
  echo "connectedToInSyncMs=$([[ $t_connected == - ]] && echo - || echo $((t_insync - t_connected)))"
  echo "servingToInSyncMs=$([[ $t_listening == - ]] && echo - || echo $((t_insync - t_listening)))"
  echo "servingToConnectedMs=$([[ $t_listening == - || $t_connected == - ]] && echo - || echo $((t_connected - t_listening)))"
  echo "rsyncMs=$((rsync_t1 - rsync_t0))"
} >"$RESYNC_KV"

# --- resync under a client write load ----------------------------------------------------------------
# The same pair: LOAD_REGIONS regions change while the secondary is down, then fio writes 4 KiB at
# QD32 (filling the in-flight window) while the secondary comes back: the resync must still end.
LOAD_REGIONS=${BENCH_LOAD_RESYNC_REGIONS:-8192}
say ""
say "resync under load: $LOAD_REGIONS regions changed while the secondary is down, resynced while fio writes 4 KiB at QD32"
wait_insync "$P" >/dev/null
rc=0
stop_daemon "$S" || rc=$?
((rc == 0)) || die "volrep secondary did not stop cleanly on SIGTERM (exit status $rc)"
node "$HELPER" scatter "127.0.0.1:${NBD_PORT[$P]}" volrep "$LOAD_REGIONS" "$region_size" ||
  die "writing $LOAD_REGIONS regions through NBD failed"
load_dirty=$(node "$HELPER" status "$PRI_HTTP" dirtyRegions) || die "cannot read /status of $P"
load_resync0=$(node "$HELPER" counter "$PRI_HTTP" volrep_resync_bytes_total) || die "cannot read /metrics of $P"
load_connects0=$(grep -c '"connected to the secondary"' "$WORK/$P.log" || true)
load_consistent0=$(count_lines "$WORK/$P.log" "$CONSISTENT")
start_secondary "$S"
# fio starts once the primary is back: its writes then go out as updates beside the resync.
for ((i = 0; i < 200; i++)); do
  (($(grep -c '"connected to the secondary"' "$WORK/$P.log" || true) > load_connects0)) && break
  sleep 0.05
done
fio --name=load --ioengine=nbd --uri="nbd://127.0.0.1:${NBD_PORT[$P]}/volrep" --rw=randwrite --bs=4k \
  --iodepth=32 --size="$SIZE" --time_based --runtime=$((RUNTIME + 20)) --output-format=json \
  >"$WORK/load-fio.json" 2>"$WORK/load-fio.log" &
LOAD_FIO=$!
read -r t_load_polled _ < <(node "$HELPER" consistent "$PRI_HTTP" 60) || die "the resync under load did not end in 60 s"
t_load_done=$(insync_time "$P" "$load_consistent0" "$t_load_polled")
load_resync1=$(node "$HELPER" counter "$PRI_HTTP" volrep_resync_bytes_total) || die "cannot read /metrics of $P"
kill -INT "$LOAD_FIO" 2>/dev/null || true
wait "$LOAD_FIO" || true
t_load_connected=$(log_time "$WORK/$P.log" 'connected to the secondary' "$load_connects0")
load_iops=$(node -e 'const s=require("fs").readFileSync(process.argv[1],"utf8");const j=JSON.parse(s.slice(s.indexOf("{")));console.log(Math.round(j.jobs[0].write.iops))' "$WORK/load-fio.json" 2>/dev/null || echo -)
wait_insync "$P" >/dev/null
cmp -s "$WORK/$P.img" "$WORK/$S.img" || die "after the resync under load the replica differs from the primary volume"
say "  resync ended with fio writing; replica identical to the primary once fio stopped (cmp)"
{
  echo "loadRegions=$LOAD_REGIONS"
  echo "loadDirtyBefore=$load_dirty"
  echo "loadResyncBytes=$((load_resync1 - load_resync0))"
  echo "loadConnectedToConsistentMs=$([[ $t_load_connected == - ]] && echo - || echo $((t_load_done - t_load_connected)))"
  echo "loadFioIops=$load_iops"
} >>"$RESYNC_KV"

# --- a fresh pair born zero ----------------------------------------------------------------------
# Two FRESH_SIZE sparse files made by `volrep create`, no --assume-clean: the primary starts, takes
# FRESH_WRITES 64 KiB writes before the secondary is up, then the secondary starts; time from the
# secondary serving to in sync (only the regions written are sent: both files are as created).
FRESH_SIZE=${BENCH_FRESH_SIZE:-1T}
FRESH_WRITES=${BENCH_FRESH_WRITES:-16}
say ""
say "fresh pair: two $FRESH_SIZE sparse volumes made by volrep create, $FRESH_WRITES regions written before the secondary starts"
SIZE_ROWS=$SIZE
SIZE=$FRESH_SIZE
volrep_create fresh
fresh_id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).volumeId)' \
  "$WORK/fresh.img.volrep/meta.json") || die "cannot read the volume id of fresh"
volrep_create fresh-secondary --secondary-of "$fresh_id"
SIZE=$SIZE_ROWS
LISTEN_PORT[fresh-secondary]=$(node "$HELPER" port)
HTTP_PORT[fresh-secondary]=$(node "$HELPER" port)
LINK_FLAGS[fresh-secondary]="--allow-peer $(identity_of fresh)"
start_primary fresh --peer "127.0.0.1:${LISTEN_PORT[fresh-secondary]}" --peer-fingerprint "$(identity_of fresh-secondary)"
node "$HELPER" scatter "127.0.0.1:${NBD_PORT[fresh]}" volrep "$FRESH_WRITES" "$region_size" ||
  die "writing $FRESH_WRITES regions to the fresh pair failed"
start_secondary fresh-secondary
read -r t_fresh_polled _ < <(wait_insync fresh) || die "the fresh pair did not get in sync"
t_fresh_insync=$(insync_time fresh 0 "$t_fresh_polled")
t_fresh_listening=$(log_time "$WORK/fresh-secondary.log" 'secondary serving')
fresh_bytes=$(node "$HELPER" counter "127.0.0.1:${HTTP_PORT[fresh]}" volrep_resync_bytes_total) ||
  die "cannot read /metrics of fresh"
grep -q 'both volumes were created empty' "$WORK/fresh.log" || die "the fresh pair did a full sync"
say "  in sync; replica allocated $(($(stat -c %b "$WORK/fresh-secondary.img") * 512)) bytes"
{
  echo "freshSizeBytes=$(stat -c %s "$WORK/fresh.img")"
  echo "freshWrites=$FRESH_WRITES"
  echo "freshResyncBytes=$fresh_bytes"
  echo "freshServingToInSyncMs=$([[ $t_fresh_listening == - ]] && echo - || echo $((t_fresh_insync - t_fresh_listening)))"
} >>"$RESYNC_KV"
rc=0
stop_daemon fresh || rc=$?
((rc == 0)) || die "volrep primary fresh did not stop cleanly (exit status $rc)"
stop_daemon fresh-secondary || rc=$?
((rc == 0)) || die "volrep secondary fresh-secondary did not stop cleanly (exit status $rc)"

# --- a full sync of a volume full of data, against nbdcopy -----------------------------------------
# A file of random data adopted by `volrep create` (it existed: no born-zero mark, so a full sync),
# replicated to a fresh replica: primary serving → in sync. Against `nbdcopy --flush` of the same
# file to a fresh sparse file served by an nbdkit of its own, run first. Both targets are new files
# (on a VM whose freed memory goes back to the host, writing pages the page cache does not hold
# yet costs several times more than overwriting cached ones: an old target would flatter either
# side); both end durable.
if command -v nbdcopy >/dev/null; then
  say ""
  say "full sync of $SIZE of random data vs nbdcopy --flush of the same file to nbdkit (both to new files)"
  full_bytes_size=$(stat -c %s "$WORK/volrep.img")
  head -c "$full_bytes_size" /dev/urandom >"$WORK/full.img"
  sync "$WORK/full.img" # its writeback would slow whichever copy ran first
  truncate -s "$full_bytes_size" "$WORK/full-nbdkit.img"
  NBD_PORT[full-nbdkit]=$(node "$HELPER" port)
  nbdkit -f --exit-with-parent -i 127.0.0.1 -p "${NBD_PORT[full-nbdkit]}" -P "$WORK/full-nbdkit.pid" \
    file "$WORK/full-nbdkit.img" >"$WORK/full-nbdkit.log" 2>&1 &
  PIDS[full-nbdkit]=$!
  wait_ready full-nbdkit "${PIDS[full-nbdkit]}" test -s "$WORK/full-nbdkit.pid"
  nbdcopy_t0=$(now_ms)
  nbdcopy --flush "$WORK/full.img" "nbd://127.0.0.1:${NBD_PORT[full-nbdkit]}/" || die "nbdcopy failed"
  nbdcopy_t1=$(now_ms)
  stop_daemon full-nbdkit || true # nbdkit exits with a signal status on SIGTERM; that is fine
  cmp -s "$WORK/full.img" "$WORK/full-nbdkit.img" || die "after nbdcopy the nbdkit file differs"
  rm -f "$WORK/full-nbdkit.img"
  volrep_create full
  full_id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).volumeId)' \
    "$WORK/full.img.volrep/meta.json") || die "cannot read the volume id of full"
  volrep_create full-secondary --secondary-of "$full_id"
  LISTEN_PORT[full-secondary]=$(node "$HELPER" port)
  HTTP_PORT[full-secondary]=$(node "$HELPER" port)
  LINK_FLAGS[full-secondary]="--allow-peer $(identity_of full)"
  start_secondary full-secondary
  start_primary full --peer "127.0.0.1:${LISTEN_PORT[full-secondary]}" --peer-fingerprint "$(identity_of full-secondary)"
  read -r t_full_polled _ < <(wait_insync full) || die "the full sync did not end"
  t_full_insync=$(insync_time full 0 "$t_full_polled")
  t_full_serving=$(log_time "$WORK/full.log" 'primary serving')
  full_resync=$(node "$HELPER" counter "127.0.0.1:${HTTP_PORT[full]}" volrep_resync_bytes_total) ||
    die "cannot read /metrics of full"
  rc=0
  stop_daemon full || rc=$?
  ((rc == 0)) || die "volrep primary full did not stop cleanly (exit status $rc)"
  stop_daemon full-secondary || rc=$?
  ((rc == 0)) || die "volrep secondary full-secondary did not stop cleanly (exit status $rc)"
  cmp -s "$WORK/full.img" "$WORK/full-secondary.img" || die "after the full sync the replica differs"
  say "  replica and nbdkit's file identical to the source (cmp)"
  {
    echo "fullBytes=$full_bytes_size"
    echo "fullResyncBytes=$full_resync"
    echo "fullServingToInSyncMs=$([[ $t_full_serving == - ]] && echo - || echo $((t_full_insync - t_full_serving)))"
    echo "fullNbdcopyMs=$((nbdcopy_t1 - nbdcopy_t0))"
  } >>"$RESYNC_KV"
fi

# --- shut down and report -------------------------------------------------------------------------
for name in volrep volrep-async volrep-sync volrep-async-plain volrep-small; do
  [[ -n ${PIDS[$name]:-} ]] || continue
  rc=0
  stop_daemon "$name" || rc=$?
  ((rc == 0)) || die "volrep primary $name did not stop cleanly (exit status $rc)"
done
for name in volrep-async-secondary volrep-sync-secondary volrep-async-plain-secondary; do
  rc=0
  stop_daemon "$name" || rc=$?
  ((rc == 0)) || die "volrep secondary $name did not stop cleanly (exit status $rc)"
done
stop_daemon nbdkit || true # nbdkit exits with a signal status on SIGTERM; that is fine
for log in "$WORK"/volrep*.log; do
  errors=$(grep -c '"level":[56]0' "$log" || true)
  if ((errors > 0)); then
    say "warning: $(basename "$log" .log) logged $errors error line(s), e.g.:"
    grep -m 3 '"level":[56]0' "$log"
  fi
done

say ""
say "medians of $REPEATS run(s), fio --ioengine=nbd --size=$SIZE --time_based --runtime=$RUNTIME --ramp_time=$RAMP" \
  "(fio part: ${FIO_SECONDS}s):"
small_env=()
if ((SMALL)); then small_env=(BENCH_SMALL_WINDOW="$SMALL_WINDOW" BENCH_SMALL_REGION="$SMALL_REGION"); fi
env BENCH_RUNTIME="$RUNTIME" BENCH_REPEATS="$REPEATS" BENCH_FIO_VERSION="$(fio --version)" \
  BENCH_NBDKIT_VERSION="$(nbdkit --version | head -n 1)" BENCH_RSYNC_VERSION="$(rsync --version | head -n 1)" \
  "${small_env[@]}" node "$HELPER" report "$SAMPLES" "$RESULT_JSON" "$RESYNC_KV" "$WORK/rsync.txt"
if ((!SMALL)); then say "note: $SMALL_NOTE"; fi
say ""
say "total bench time: $(($(date +%s) - BENCH_T0))s; JSON: $RESULT_JSON"
