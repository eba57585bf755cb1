#!/usr/bin/env bash
# Compares what users and scripts see of two bindtrace binaries: the --help texts, the JSON
# field sets of every event kind (refused, audit, lost) and the /metrics families with their
# label names. For refactors that must not change behaviour:
#   sudo tests/surface.sh OLD_BINARY NEW_BINARY
# Each binary runs the same scenario, made here and removed on exit: a bridge and a container
# namespace (198.18.77.0/24, a benchmarking range no machine uses) with a server on
# 127.0.0.1:8000, one refused connection, a 4 KiB ring flooded by 300 new ports so that a
# `lost` line appears; with Docker, a busybox container publishing a loopback-bound port for the
# `audit` line. Exit 0 when both surfaces are equal, 1 with the diff otherwise.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "surface.sh: needs root (namespaces, eBPF)" >&2; exit 2; }
old=$(readlink -f "$1") new=$(readlink -f "$2")
work=$(mktemp -d)
br=btsurf0 ns=btsurf-ctr ctr="btsurf-$$" img="btsurf-img-$$:busybox"

cleanup() {
  set +e
  [ -f "$work/server.pid" ] && kill "$(cat "$work/server.pid")" 2>/dev/null
  docker rm -f "$ctr" >/dev/null 2>&1
  docker rmi "$img" >/dev/null 2>&1
  ip netns del "$ns" 2>/dev/null
  ip link del "$br" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

ip link add "$br" type bridge && ip addr add 198.18.77.1/24 dev "$br" && ip link set "$br" up
ip netns add "$ns"
ip link add btsurf-h type veth peer name eth0 netns "$ns"
ip link set btsurf-h master "$br" up
ip -n "$ns" addr add 198.18.77.2/24 dev eth0
ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up
ip netns exec "$ns" python3 -c '
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8000)); s.listen(); time.sleep(3600)' &
echo $! > "$work/server.pid"

docker_up=false
if docker info >/dev/null 2>&1; then
  docker_up=true
  mkdir -p "$work/root/bin"
  cp /bin/busybox "$work/root/bin/busybox"
  tar -C "$work/root" -c . | docker import - "$img" >/dev/null
fi

# Connects to each port once; every one is refused (nothing listens on 198.18.77.2).
refuse() {
  python3 - "$@" <<'PY'
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[2])):
    s = socket.socket(); s.settimeout(2)
    try: s.connect(("198.18.77.2", port))
    except OSError: pass
    s.close()
PY
}

# Keys of each JSON event kind, sorted, one "kind: key" per line (nested objects as a.b).
json_shape() {
  python3 -c '
import json, sys
def keys(o, pre=""):
    for k, v in o.items():
        yield pre + k
        if isinstance(v, dict): yield from keys(v, pre + k + ".")
seen = set()
for line in sys.stdin:
    try: o = json.loads(line)
    except ValueError: continue
    kind = o.get("event", "?")
    seen.update(f"{kind}: {k}" for k in keys(o))
print("\n".join(sorted(seen)))'
}

# Metric families and their label names, sorted.
metric_shape() {
  python3 -c '
import re, sys
out = set()
for line in sys.stdin:
    if line.startswith("#") or not line.strip(): continue
    m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
    labels = sorted(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=", m.group(3) or ""))
    out.add(m.group(1) + "{" + ",".join(labels) + "}")
print("\n".join(sorted(out)))'
}

surface() {  # binary outdir
  local bin=$1 out=$2 args=(--format json --ringbuf-size 4096 --metrics-addr 127.0.0.1:19531)
  mkdir -p "$out"
  "$bin" --help > "$out/help.txt"
  "$bin" check --help > "$out/check-help.txt"
  if $docker_up; then
    docker run -d --name "$ctr" -p 127.0.0.1:18931:8931 "$img" /bin/busybox httpd -f -p 127.0.0.1:8931 >/dev/null
    args+=(-i docker0 -i "$br")
  else
    args+=(-i "$br" --no-docker)
  fi
  "$bin" "${args[@]}" > "$out/lines.json" 2> "$out/stderr.txt" &
  local pid=$!
  until grep -q 'bindtrace: ready' "$out/stderr.txt"; do
    kill -0 "$pid" 2>/dev/null || { cat "$out/stderr.txt" >&2; exit 1; }
    sleep 0.1
  done
  refuse 8000 8001
  kill -STOP "$pid"; refuse 20000 20300; kill -CONT "$pid"
  curl -s http://127.0.0.1:19531/metrics | metric_shape > "$out/metrics.txt"
  kill -INT "$pid"; wait "$pid" || true
  $docker_up && docker rm -f "$ctr" >/dev/null
  json_shape < "$out/lines.json" > "$out/json.txt"
  grep -q '^refused: ' "$out/json.txt" || { echo "surface.sh: $bin printed no refused line" >&2; exit 1; }
}

surface "$old" "$work/old"
surface "$new" "$work/new"
status=0
for f in help.txt check-help.txt json.txt metrics.txt; do
  if diff -u "$work/old/$f" "$work/new/$f" > "$work/$f.diff"; then
    echo "surface.sh: $f: same ($(wc -l < "$work/new/$f") lines)"
  else
    echo "surface.sh: $f differs:"; cat "$work/$f.diff"; status=1
  fi
done
echo "surface.sh: event kinds compared: $(cut -d: -f1 "$work/new/json.txt" | sort -u | tr '\n' ' ')"
exit $status
