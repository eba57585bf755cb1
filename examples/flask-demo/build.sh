#!/usr/bin/env bash
# Builds the image of the README's session, bindtrace-demo:flask (Debian's Python 3.11, Flask and
# gunicorn from PyPI, app.py), with `docker import`: no registry needed. Needs pip on the host.
#   examples/flask-demo/build.sh [TAG]
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
TAG=${1:-bindtrace-demo:flask}
PY=/usr/bin/python3.11
[ -x "$PY" ] || { echo "build.sh: needs Debian's $PY (apt-get install python3)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

mkdir -p "$root/usr/bin" "$root/usr/lib" "$root/app" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
cp "$PY" "$root/usr/bin/python3"
# The standard library, without its tests.
cp -a /usr/lib/python3.11 "$root/usr/lib/"
rm -rf "$root/usr/lib/python3.11/test" "$root/usr/lib/python3.11/"*/tests
# Shared libraries of the interpreter and of its extension modules.
for f in "$PY" /usr/lib/python3.11/lib-dynload/*.so; do ldd "$f"; done |
  awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
  while read -r lib; do mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; done
# Flask and gunicorn where Debian's Python looks for packages.
python3 -m pip install --quiet --no-compile --no-warn-script-location --root-user-action=ignore \
  --target "$root/usr/lib/python3/dist-packages" flask gunicorn
rm -rf "$root/usr/lib/python3/dist-packages/bin"
printf '#!/usr/bin/python3\nfrom gunicorn.app.wsgiapp import run\nrun()\n' > "$root/usr/bin/gunicorn"
chmod 755 "$root/usr/bin/gunicorn"
echo "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin" > "$root/etc/passwd"
cp app.py "$root/app/"
tar -C "$root" -c . | docker import --change 'WORKDIR /app' --change 'ENV PATH=/usr/bin' - "$TAG" >/dev/null
echo "built $TAG"
