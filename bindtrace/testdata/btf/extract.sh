#!/bin/bash
# Reproduces the BTF fixtures next to this script:
#   vmlinux-6.18.btf.gz  gzip -9 of the running kernel's /sys/kernel/btf/vmlinux (only on a 6.18 kernel)
#   vmlinux-6.1.btf.gz   .BTF section of Debian bookworm's linux-image-6.1.0-<N>-amd64
#   vmlinux-5.10.btf.gz  .BTF section of Debian bullseye's linux-image-5.10.0-<N>-amd64
# Usage: extract.sh [workdir]   (default: a fresh mktemp -d). Idempotent: downloads are reused,
# outputs are overwritten. gzip -n keeps the output free of names/timestamps, so equal input
# gives byte-equal fixtures (see README.md for the sha256 sums).
# Needs: apt-get, dpkg-deb, objcopy (binutils), xz-utils, zstd, gzip. Never touches /etc/apt:
# bullseye comes through a private APT_CONFIG inside the work dir.
# Override the kernel ABIs with K61=6.1.0-NN K510=5.10.0-NN; "latest" picks the newest one.
set -euo pipefail
OUT=$(cd "$(dirname "$0")" && pwd)
W=${1:-$(mktemp -d)}; mkdir -p "$W"; W=$(cd "$W" && pwd)
K61=${K61:-6.1.0-56}     # newest bookworm ABI when the fixtures were made
K510=${K510:-5.10.0-46}  # newest bullseye-security ABI (bullseye main alone stops at 5.10.0-32)
echo "work dir: $W"

# gzip -9 -n into place atomically, so a test run meanwhile never sees half a fixture.
put() {  # $1 = raw BTF, $2 = fixture name
  gzip -9 -n -c "$1" > "$OUT/$2.tmp" && mv "$OUT/$2.tmp" "$OUT/$2"
}

# --- the running kernel --------------------------------------------------------------------
if [[ $(uname -r) == 6.18.* && -r /sys/kernel/btf/vmlinux ]]; then
  put /sys/kernel/btf/vmlinux vmlinux-6.18.btf.gz
else
  echo "running kernel is $(uname -r), not 6.18: keeping the existing vmlinux-6.18.btf.gz" >&2
fi

# --- apt: bookworm through the system config, bullseye through a private one ----------------
mkdir -p "$W/dl" "$W/lists/partial" "$W/bullseye-cache/archives/partial"
printf '%s\n' 'deb http://deb.debian.org/debian bullseye main' \
              'deb http://deb.debian.org/debian-security bullseye-security main' > "$W/bullseye.list"
cat > "$W/bullseye-apt.conf" <<CONF
Dir::Etc::sourcelist "$W/bullseye.list";
Dir::Etc::sourceparts "-";
Dir::State::Lists "$W/lists";
Dir::Cache "$W/bullseye-cache";
Dir::State::status "/dev/null";
APT::Sandbox::User "root";
CONF
BULLSEYE=(env APT_CONFIG="$W/bullseye-apt.conf")
# Sandbox::User root (here and in the conf): _apt cannot write into a 0700 mktemp dir; apt
# would fall back to root anyway, with a warning.

# Newest linux-image-<abi>-amd64 the meta package points at ("latest" mode only).
newest_abi() {  # $1 = apt prefix (may be empty)
  "$@" apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*\)-amd64$/\1/p' | head -1
}

have_deb() { compgen -G "$W/dl/linux-image-$1-amd64_*.deb" > /dev/null; }

if ! have_deb "$K61"; then
  apt-get update
  [[ $K61 == latest ]] && K61=$(newest_abi)
  have_deb "$K61" || (cd "$W/dl" && apt-get -o APT::Sandbox::User=root download "linux-image-$K61-amd64")
fi
if ! have_deb "$K510"; then
  "${BULLSEYE[@]}" apt-get update
  [[ $K510 == latest ]] && K510=$(newest_abi "${BULLSEYE[@]}")
  have_deb "$K510" || (cd "$W/dl" && "${BULLSEYE[@]}" apt-get download "linux-image-$K510-amd64")
fi

# --- vmlinuz -> vmlinux (the scripts/extract-vmlinux approach) -------------------------------
# Tries each offset where a compression magic occurs, keeps the first that decompresses to ELF.
try_decompress() {  # $1 = image, $2 = magic (grep -P), $3 = decompress command, $4 = output
  local pos
  for pos in $(LC_ALL=C grep -obUaP "$2" "$1" | cut -d: -f1); do
    tail -c +$((pos + 1)) "$1" | $3 > "$4" 2> /dev/null || true
    if [[ $(head -c 4 "$4" | od -An -c | tr -d ' ') == '177ELF' ]]; then return 0; fi
  done
  return 1
}

extract_btf() {  # $1 = kernel ABI, $2 = fixture name
  local abi=$1 dir="$W/k/$1" img vmlinux="$W/vmlinux-$1" btf="$W/vmlinux-$1.btf"
  rm -rf "$dir"; mkdir -p "$dir"
  dpkg-deb -x "$(compgen -G "$W/dl/linux-image-$abi-amd64_*.deb" | head -1)" "$dir"
  img="$dir/boot/vmlinuz-$abi-amd64"
  try_decompress "$img" '\xFD7zXZ\x00' 'xz -dc' "$vmlinux" ||
    try_decompress "$img" '\x28\xB5\x2F\xFD' 'zstd -dc' "$vmlinux" ||
    try_decompress "$img" '\x1F\x8B\x08' 'gzip -dc' "$vmlinux" ||
    { echo "no vmlinux found in $img" >&2; return 1; }
  objcopy -O binary --only-section=.BTF "$vmlinux" "$btf"
  [[ $(od -An -tx1 -N2 "$btf" | tr -d ' ') == 9feb ]] || { echo "$btf: not BTF" >&2; return 1; }
  put "$btf" "$2"
  echo "$2 <- $(basename "$(compgen -G "$W/dl/linux-image-$abi-amd64_*.deb" | head -1)")"
}

extract_btf "$K61" vmlinux-6.1.btf.gz
extract_btf "$K510" vmlinux-5.10.btf.gz
(cd "$OUT" && ls -l vmlinux-*.btf.gz && sha256sum vmlinux-*.btf.gz)
