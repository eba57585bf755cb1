#!/usr/bin/env bash
# Where the generator's CPU goes during a refused-connection flood, by sampling (perf's
# cpu-clock: works on VMs without a PMU). Prints, per configuration, the share of CPU 0's
# samples spent in BPF programs and in the helpers, maps and tracing code they call: the part
# of the throughput a tracer takes, without the run-to-run drift of a rate measurement.
#
#   sudo tests/bench-profile.sh            # after `sudo ./x bench --short` built the binaries
#   sudo tests/bench-profile.sh --ordinary # the same during ordinary traffic instead (the bench's
#                                          # "Ordinary traffic" phase: nginx in the container,
#                                          # wrk -t1 -c32 with one connection per request)
#
# With --ordinary the connections succeed, and the server's half of each runs on CPU 1 (nginx,
# and the softirq of its replies), where the tracer runs too: both CPUs are sampled, and the
# tracer's own threads (its userspace and syscalls) are reported next to the BPF symbols.
# Conntrack is on in the host namespace (a DNAT rule for a published port, as Docker adds).
#
# Needs Debian's linux-perf and bpftrace (and nginx and wrk for --ordinary: ./x setup). Builds its own namespaces (a "host" with a bridge named
# docker0 and a container on a veth), sends traffic only to them, stops by itself, cleans up.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
BT=target/release/bindtrace
LG=target/release/bindtrace-loadgen
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
ORDINARY=
case "${1:-}" in
  --ordinary) ORDINARY=1 ;;
  "") ;;
  *) echo "usage: bench-profile.sh [--ordinary]" >&2; exit 2 ;;
esac
needs=(perf bpftrace "$BT" "$LG")
[ -z "$ORDINARY" ] || needs+=(nginx wrk)
for need in "${needs[@]}"; do
  command -v "$need" >/dev/null || [ -x "$need" ] || { echo "bench-profile: missing $need (apt install linux-perf bpftrace; ./x bench --short)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench-profile: needs root" >&2; exit 1; }

H=btprof$$h C=btprof$$c
TMP=$(mktemp -d)
NGINX=
cleanup() {
  [ -z "$NGINX" ] || { kill "$NGINX" 2>/dev/null; wait "$NGINX" 2>/dev/null || true; }
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
ip -n "$C" route add default via 172.17.0.1
if [ -n "$ORDINARY" ]; then
  mkdir -p "$TMP/nginx"
  cat > "$TMP/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx; proxy_temp_path $TMP/nginx; fastcgi_temp_path $TMP/nginx;
  uwsgi_temp_path $TMP/nginx; scgi_temp_path $TMP/nginx;
  server { listen 0.0.0.0:8080 backlog=4096; location / { return 200 "ok\n"; } }
}
CONF
  # Conntrack on in the host namespace, as on a Docker host (a published port's DNAT rule; the
  # traffic goes to the container's address). TIME_WAIT entries expire after 1 s instead of
  # 120 s, so that the destroy events of a run's connections (bindtrace follows them) come
  # during the run, as they do in a steady state.
  ip netns exec "$H" iptables -w -t nat -A OUTPUT -m addrtype --dst-type LOCAL -p tcp --dport 18080 -j DNAT --to-destination 172.17.0.2:8080
  ip netns exec "$H" sysctl -q -w net.netfilter.nf_conntrack_tcp_timeout_time_wait=1
  taskset -c 1 ip netns exec "$C" nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e stderr -g 'daemon off;' &
  NGINX=$!
  for _ in $(seq 100); do ip netns exec "$H" bash -c 'exec 3<>/dev/tcp/172.17.0.2/8080' 2>/dev/null && break; sleep 0.1; done
fi
[ -d /sys/kernel/tracing/events ] || { mount -t tracefs nodev /sys/kernel/tracing; trap 'cleanup; umount /sys/kernel/tracing' EXIT; }

# Symbols counted as the tracer's (BPF programs, their helpers and maps, tracepoint plumbing).
# The no-tracer run shows what matches anyway (memset, clock reads by the stack itself...).
PATTERN='^(bpf_|__bpf|htab_|__htab|trie_|pcpu_freelist|lookup_nulls_elem_raw|lookup_elem_raw|ktime_get|read_tsc|perf_trace|trace_event_|__traceiter|copy_from_kernel_nofault|__pi_memset|perf_swevent|perf_tp_event|_raw_spin_lock_irqsave|prealloc_lru|bpf_lru)'

# SIGINT as a user would stop it (and the tracer prints its totals); SIGTERM if it is ignored
# (a background job of a script starts with SIGINT ignored; bpftrace keeps it so).
stop() {
  kill -INT "$1"
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

profile() {
  local label=$1; shift
  local pid=""
  if [ "$1" != none ]; then
    taskset -c 1 "$@" >/dev/null 2>&1 &
    pid=$!
    sleep 3
  fi
  local cpus=0 load
  if [ -n "$ORDINARY" ]; then
    cpus=0,1
    taskset -c 0 ip netns exec "$H" wrk -t1 -c32 -d$((SECONDS_PER_RUN + 2))s -H 'Connection: close' http://172.17.0.2:8080/ > "$TMP/load.txt" &
  else
    taskset -c 0 ip netns exec "$H" "$LG" --target 172.17.0.2 --ports 8000-8000 --seconds $((SECONDS_PER_RUN + 2)) > "$TMP/load.txt" &
  fi
  load=$!
  sleep 1
  perf record -q -e cpu-clock -F 5000 -C "$cpus" -o "$TMP/perf.data" -- sleep "$SECONDS_PER_RUN" 2>/dev/null
  wait "$load"
  local comms="" p
  # The tracer may run under `ip netns exec` (a parent that waits): its threads' names, and its
  # child's.
  if [ -n "$pid" ]; then
    for p in "$pid" $(pgrep -P "$pid"); do
      comms+=$(cat /proc/"$p"/task/*/comm 2>/dev/null | tr '\n' ' ')
    done
    stop "$pid"
  fi
  perf report -q -i "$TMP/perf.data" --no-children --sort symbol 2>/dev/null | awk -v l="$label" -v pat="$PATTERN" -v c="$cpus" '
    { p=$1; sub("%","",p); s=$3 }
    s ~ pat && s !~ /^bpf_lsm/ { t+=p; if (p >= 0.1) d=d" "s"="p"%" }
    END { printf "%-32s %5.2f%% of CPU %s in matching symbols\n    %s\n", l, t, c, d }'
  if [ -n "$ORDINARY" ]; then
    # The tracer's own threads (by name: samples of a thread carry its comm).
    perf report -q -i "$TMP/perf.data" --no-children --sort comm 2>/dev/null | awk -v names=" $comms" '
      { p=$1; sub("%","",p); if (names != " " && index(names, " " $2 " ")) t+=p }
      END { printf "    the tracer'"'"'s own threads (%s): %.2f%% of CPU 0,1\n", substr(names, 2), t }'
    # Conntrack's event delivery (ctnetlink builds and multicasts a message per event only
    # while someone, like bindtrace, listens), wherever it runs.
    perf report -q -i "$TMP/perf.data" --no-children --sort symbol 2>/dev/null | awk '
      { p=$1; sub("%","",p); s=$3 }
      s ~ /^(ctnetlink_|nf_conntrack_event|nf_ct_deliver_cached_events|netlink_broadcast|__netlink_sendskb|nf_ct_ecache)/ { t+=p; if (p >= 0.05) d=d" "s"="p"%" }
      END { printf "    conntrack event delivery (kernel): %.2f%% of CPU 0,1%s\n", t, d }'
    grep -E 'Requests/sec|Socket errors|Non-2xx' "$TMP/load.txt" | sed 's/^ */    wrk: /'
  fi
}

profile "no tracer" none
profile "bindtrace --hook tcp-send-reset" ip netns exec "$H" "$BT" --hook tcp-send-reset -i docker0 --no-docker --no-metrics
profile "bindtrace --hook kfree-skb" ip netns exec "$H" "$BT" --hook kfree-skb -i docker0 --no-docker --no-metrics
[ -z "$ORDINARY" ] || profile "bindtrace --hook tc" ip netns exec "$H" "$BT" --hook tc -i docker0 --no-docker --no-metrics
profile "bpftrace, count by port" bpftrace -e 'tracepoint:tcp:tcp_send_reset /args->reason == 1/ { @refused[(uint16)((args->saddr[2] << 8) | args->saddr[3])] = count(); }'
