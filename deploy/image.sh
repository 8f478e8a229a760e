#!/bin/sh
# Packages Academy's binaries into an image with buildah, without Docker or a
# registry: FROM scratch, the binaries (stripped), the libraries `ldd` lists
# and the loader. `make image` runs it on release binaries; the smoke test on
# the test build's.
#
#   deploy/image.sh BINDIR TAG      e.g. deploy/image.sh target/release academy:0.1.0
set -eu
bindir=$1
tag=$2
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman/containers.conf}"
stage=$(mktemp -d)
container=
cleanup() {
    rm -rf "$stage"
    if [ -n "$container" ]; then buildah rm "$container" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
mkdir -p "$stage/usr/local/bin"
for binary in academy-exchange academy-launcher academy worker; do
    [ -x "$bindir/$binary" ] || { echo "image.sh: no $bindir/$binary; build it first" >&2; exit 1; }
    strip -o "$stage/usr/local/bin/$binary" "$bindir/$binary"
done
libraries() {
    for binary in "$stage"/usr/local/bin/*; do
        ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
    done | sort -u
}
for lib in $(libraries); do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done
container=$(buildah from scratch)
buildah copy "$container" "$stage" / >/dev/null
version=${tag##*:}
buildah config --user 10001:10001 --env PATH=/usr/local/bin --env ACADEMY_LOG_FORMAT=json \
    --port 50051 --port 50052 --port 9464 --entrypoint '[]' --cmd academy-exchange \
    --label org.opencontainers.image.title=academy \
    --label org.opencontainers.image.version="$version" "$container"
buildah commit -q "$container" "$tag" >/dev/null
echo "built $tag"
