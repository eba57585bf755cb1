#!/usr/bin/env bash
# Where the generator's CPU goes during a refused-connection flood, by sampling (perf's
# cpu-clock: works on VMs without a PMU). Prints, per configuration, the share of CPU 0's
# samples spent in BPF programs and in the helpers, maps and tracing code they call: the part
# of the throughput a tracer takes, without the run-to-run drift of a rate measurement.
#
#   sudo tests/bench-profile.sh            # after `sudo ./x bench --short` built the binaries
#
# Needs Debian's linux-perf and bpftrace. Builds its own namespaces (a "host" with a bridge named
# docker0 and a container on a veth), sends traffic only to them, stops by itself, cleans up.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
BT=target/release/bindtrace
LG=target/release/bindtrace-loadgen
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
for need in perf bpftrace "$BT" "$LG"; do
  command -v "$need" >/dev/null || [ -x "$need" ] || { echo "bench-profile: missing $need (apt install linux-perf bpftrace; ./x bench --short)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench-profile: needs root" >&2; exit 1; }

H=btprof$$h C=btprof$$c
TMP=$(mktemp -d)
cleanup() {
  ip netns del "$H" 2>/dev/null || true
  ip netns del "$C" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
ip netns add "$H"; ip netns add "$C"
ip -n "$H" link set lo up; ip -n "$C" link set lo up
ip -n "$H" link add docker0 type bridge
ip -n "$H" addr add 172.17.0.1/16 dev docker0
ip -n "$H" link set docker0 up
ip -n "$H" link add vbprof type veth peer name vpprof
ip -n "$H" link set vbprof master docker0 up
ip -n "$H" link set vpprof netns "$C"
ip -n "$C" link set vpprof name eth0
ip -n "$C" addr add 172.17.0.2/16 dev eth0
ip -n "$C" link set eth0 up
[ -d /sys/kernel/tracing/events ] || { mount -t tracefs nodev /sys/kernel/tracing; trap 'cleanup; umount /sys/kernel/tracing' EXIT; }

# Symbols counted as the tracer's (BPF programs, their helpers and maps, tracepoint plumbing).
# The no-tracer run shows what matches anyway (memset, clock reads by the stack itself...).
PATTERN='^(bpf_|__bpf|htab_|__htab|trie_|pcpu_freelist|lookup_nulls_elem_raw|lookup_elem_raw|ktime_get|read_tsc|perf_trace|trace_event_|__traceiter|copy_from_kernel_nofault|__pi_memset|perf_swevent|perf_tp_event|_raw_spin_lock_irqsave|prealloc_lru|bpf_lru)'

profile() {
  local label=$1; shift
  local pid=""
  if [ "$1" != none ]; then
    taskset -c 1 "$@" >/dev/null 2>&1 &
    pid=$!
    sleep 3
  fi
  taskset -c 0 ip netns exec "$H" "$LG" --target 172.17.0.2 --ports 8000-8000 --seconds $((SECONDS_PER_RUN + 2)) > "$TMP/load.json" &
  local load=$!
  sleep 1
  perf record -q -e cpu-clock -F 5000 -C 0 -o "$TMP/perf.data" -- sleep "$SECONDS_PER_RUN" 2>/dev/null
  wait "$load"
  [ -n "$pid" ] && { kill -INT "$pid"; wait "$pid" 2>/dev/null || true; }
  perf report -q -i "$TMP/perf.data" --no-children --sort symbol 2>/dev/null | awk -v l="$label" -v pat="$PATTERN" '
    { p=$1; sub("%","",p); s=$3 }
    s ~ pat && s !~ /^bpf_lsm/ { t+=p; if (p >= 0.1) d=d" "s"="p"%" }
    END { printf "%-32s %5.2f%% of CPU 0 in matching symbols\n    %s\n", l, t, d }'
}

profile "no tracer" none
profile "bindtrace --hook tcp-send-reset" ip netns exec "$H" "$BT" --hook tcp-send-reset -i docker0 --no-docker --no-metrics
profile "bindtrace --hook kfree-skb" ip netns exec "$H" "$BT" --hook kfree-skb -i docker0 --no-docker --no-metrics
profile "bpftrace, count by port" bpftrace -e 'tracepoint:tcp:tcp_send_reset /args->reason == 1/ { @refused[(uint16)((args->saddr[2] << 8) | args->saddr[3])] = count(); }'
