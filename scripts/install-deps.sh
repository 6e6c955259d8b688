#!/usr/bin/env bash
# Installs what capsem needs to build the guest image and run real VMs on
# Debian 12 (bookworm). Idempotent: prints one line per thing it installs and
# nothing when everything is already there. Needs root for apt (or sudo).
set -euo pipefail

# Debian packages: binary -> package (the binary proves the package is there).
declare -A APT=(
    [qemu-system-x86_64]=qemu-system-x86 # the VMM
    [cpio]=cpio                          # initramfs archive
    [gzip]=gzip                          # initramfs compression
    [xz]=xz-utils                        # the kernel payload (vmlinux) and .ko.xz modules
    [lz4]=lz4                            # the cloud kernel's payload (vmlinux)
    [readelf]=binutils                   # checks vmlinux has its PVH entry note
    [sha256sum]=coreutils
    [mmdebstrap]=mmdebstrap  # the guest's Debian root filesystem
    [mkfs.erofs]=erofs-utils # its read-only image, and OCI images' (fsck.erofs for tests)
    # each VM's writable disk (capsem-process); by path: /usr/sbin is not on
    # every user's PATH
    [/usr/sbin/mkfs.ext4]=e2fsprogs
    [docker-registry]=docker-registry # the image tests' loopback registry
    [/bin/busybox]=busybox-static     # the root of the OCI tests' tiny image
    # the network tests' loopback servers (tests/servers/serve.py): TLS
    # with a certificate the test makes, git's smart HTTP, a pip index
    [python3]=python3
    [openssl]=openssl
    [git]=git
)
VHOST_VSOCK_VERSION=0.3.0 # the version docs/qemu-notes.md was verified with
VIRTIOFSD_VERSION=1.14.0   # serves -v shares; docs/shares.md
# Libraries virtiofsd builds against (cargo install), by package.
LIB_PKGS=(libseccomp-dev libcap-ng-dev)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi

missing=()
for bin in "${!APT[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("${APT[$bin]}")
done
for pkg in "${LIB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    # Quiet on success; the full apt output on failure.
    if ! log=$("${SUDO[@]}" apt-get update -qq 2>&1 &&
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" 2>&1); then
        printf '%s\n' "$log" >&2
        echo "error: apt-get could not install: ${missing[*]}" >&2
        exit 1
    fi
    for pkg in "${missing[@]}"; do echo "installed $pkg (apt)"; done
    # Debian enables a registry service on :5000 (all interfaces); the tests
    # start their own on loopback, so keep the service off.
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust (https://rustup.rs) and rerun" >&2
    exit 1
fi

have_vsock=""
for v in "$(command -v vhost-device-vsock 2>/dev/null || true)" "$HOME/.cargo/bin/vhost-device-vsock"; do
    if [ -n "$v" ] && [ -x "$v" ] && "$v" --version 2>/dev/null | grep -qx "vhost-device-vsock $VHOST_VSOCK_VERSION"; then
        have_vsock=$v
        break
    fi
done
if [ -z "$have_vsock" ]; then
    cargo install --quiet --locked vhost-device-vsock --version "$VHOST_VSOCK_VERSION"
    echo "installed vhost-device-vsock $VHOST_VSOCK_VERSION (cargo, ~/.cargo/bin)"
fi

have_virtiofsd=""
for v in "$(command -v virtiofsd 2>/dev/null || true)" "$HOME/.cargo/bin/virtiofsd"; do
    if [ -n "$v" ] && [ -x "$v" ] && "$v" --version 2>/dev/null | grep -qx "virtiofsd $VIRTIOFSD_VERSION"; then
        have_virtiofsd=$v
        break
    fi
done
if [ -z "$have_virtiofsd" ]; then
    cargo install --quiet --locked virtiofsd --version "$VIRTIOFSD_VERSION"
    echo "installed virtiofsd $VIRTIOFSD_VERSION (cargo, ~/.cargo/bin)"
fi
