#!/usr/bin/env bash
# `make images`: a CPython 3.10 base image made here (no registry can be pulled), the cipherfeed
# image built on it with podman (runc), and one container started and checked (deploy/podman_smoke.py).
#
# The base: Debian 12 (bookworm) by debootstrap has python3.11 only, and openfhe's wheel imports on
# 3.10 alone, so the base is a bookworm minbase rootfs plus the CPython 3.10 build the bootstrap
# uses (pyenv's, or $CIPHERFEED_IMAGE_PYTHON), copied into /usr/local the way the
# python:3.10-slim-bookworm image lays it out (bin, lib/python3.10 without tests and site-packages,
# libpython3.10.so, headers for the builder's compiler), then `podman import`.
# With a registry at hand, skip all this: podman build --build-arg BASE_IMAGE=python:3.10-slim-bookworm.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_TAG=${CIPHERFEED_BASE_IMAGE:-localhost/cipherfeed-base:3.10-bookworm}
IMAGE_TAG=${CIPHERFEED_IMAGE:-localhost/cipherfeed:dev}
WORK=${CIPHERFEED_IMAGE_WORK:-/var/tmp/cipherfeed-images}
RUNTIME=(--runtime /usr/sbin/runc)
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/sbin/runc ] || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  echo "images: installing ${need[*]} (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi

python_prefix=${CIPHERFEED_IMAGE_PYTHON:-$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')}
"$python_prefix/bin/python3.10" -c 'import sys; assert sys.version_info[:2] == (3, 10)' \
  || { echo "images: $python_prefix is not a CPython 3.10 build" >&2; exit 2; }

if ! podman image exists "$BASE_TAG"; then
  rootfs="$WORK/rootfs"
  if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
    rm -rf "$rootfs"; mkdir -p "$WORK"
    echo "images: debootstrap bookworm minbase into $rootfs" >&2
    # The shared libraries CPython's extension modules link (ssl, sqlite3, ctypes, lzma, bz2,
    # readline, curses, uuid, dbm) and OpenMP for openfhe.
    debootstrap --variant=minbase \
      --include=ca-certificates,libssl3,libsqlite3-0,libffi8,zlib1g,liblzma5,libbz2-1.0,libreadline8,libncursesw6,libtinfo6,libuuid1,libgdbm6,libnsl2,libexpat1,libgomp1,netbase,tzdata \
      bookworm "$rootfs" http://deb.debian.org/debian >&2
  fi
  echo "images: CPython from $python_prefix into /usr/local" >&2
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/usr/local/lib" "$rootfs/usr/local/include"
  cp -a "$python_prefix/bin/python3.10" "$rootfs/usr/local/bin/"
  ln -sf python3.10 "$rootfs/usr/local/bin/python3"
  ln -sf python3 "$rootfs/usr/local/bin/python"
  cp -a "$python_prefix"/lib/libpython3.10.so* "$python_prefix/lib/libpython3.so" "$rootfs/usr/local/lib/"
  rm -rf "$rootfs/usr/local/lib/python3.10"
  tar -C "$python_prefix/lib" --exclude=python3.10/test --exclude=python3.10/site-packages \
    --exclude=python3.10/idlelib --exclude=python3.10/tkinter --exclude='python3.10/lib-dynload/_tkinter*' \
    --exclude=__pycache__ -cf - python3.10 | tar -C "$rootfs/usr/local/lib" -xf -
  mkdir -p "$rootfs/usr/local/lib/python3.10/site-packages"
  cp -a "$python_prefix/include/python3.10" "$rootfs/usr/local/include/"
  chroot "$rootfs" /sbin/ldconfig
  chroot "$rootfs" /usr/local/bin/python3 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, venv, ensurepip'
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -cf - . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG" >&2
fi

# Behind a TLS-intercepting proxy pip needs the host's CA bundle: mounted for the build only.
ca_args=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  ca_args=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
echo "images: podman build $IMAGE_TAG on $BASE_TAG" >&2
podman build "${RUNTIME[@]}" "${ULIMITS[@]}" "${ca_args[@]}" --build-arg "BASE_IMAGE=$BASE_TAG" \
  -f deploy/Dockerfile -t "$IMAGE_TAG" .
podman image inspect --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}' "$IMAGE_TAG"

.venv/bin/python -m deploy.podman_smoke --image "$IMAGE_TAG"
