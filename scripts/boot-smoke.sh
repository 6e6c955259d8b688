#!/usr/bin/env bash
# Boots the guest image under QEMU (TCG by default) with vhost-device-vsock
# and checks the agent's hello reaches the host's Unix socket, then drives
# one generation (HelloAck, terminal connection, Shutdown) and waits for the
# guest to power off. Prints one timing line; exits non-zero on failure.
#
# usage: scripts/boot-smoke.sh [q35|pc|microvm] [RUNS]
#   CAPSEM_IMAGE_DIR  image to boot (default ${CAPSEM_HOME:-~/.capsem}/images/default)
#   CAPSEM_ACCEL      tcg (default; the PVM /dev/kvm on some hosts hangs) or kvm
#   CAPSEM_EXTRA_CMDLINE  appended to the kernel command line
#   CAPSEM_MACHINE_OPTS   appended to -M MACHINE (e.g. ",pit=off,pic=off,rtc=off")
# Every process it starts is killed and reaped before it exits.
set -euo pipefail
MACHINE=${1:-q35}
RUNS=${2:-1}
IMG=${CAPSEM_IMAGE_DIR:-${CAPSEM_HOME:-$HOME/.capsem}/images/default}
VSOCKD=$(command -v vhost-device-vsock || echo "$HOME/.cargo/bin/vhost-device-vsock")
for f in vmlinuz initramfs.cpio.gz; do [ -f "$IMG/$f" ] || { echo "no $IMG/$f (run images/build.sh)" >&2; exit 1; }; done

exec python3 - "$MACHINE" "$RUNS" "$IMG" "$VSOCKD" "${CAPSEM_ACCEL:-tcg}" "${CAPSEM_EXTRA_CMDLINE:-}" <<'PY'
import os, secrets, socket, subprocess, sys, tempfile, threading, time, statistics

machine, runs, img, vsockd, accel, extra = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
HELLO_ACK = bytes.fromhex("0000002582a174a968656c6c6f5f61636ba16382a776657273696f6e01aa67656e657261"
                          "74696f6e02")  # HostToGuest::HelloAck{version:1, generation:2}
SHUTDOWN = bytes.fromhex("0000000c81a174a873687574646f776e")  # HostToGuest::Shutdown
MEM = "512M"

def qemu_cmd(d, token):
    dev = {"microvm": "vhost-user-vsock-device", "q35": "vhost-user-vsock-pci",
           "pc": "vhost-user-vsock-pci"}[machine]
    cmdline = f"console=ttyS0 quiet panic=-1 capsem.token={token} {extra}".strip()
    return ["qemu-system-x86_64", "-accel", accel, "-M", f"{machine}{os.environ.get('CAPSEM_MACHINE_OPTS', '')},memory-backend=mem",
            "-cpu", "max", "-m", MEM, "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio",
            "-object", f"memory-backend-memfd,id=mem,size={MEM},share=on",
            "-chardev", f"socket,id=vsock,path={d}/vhost.sock",
            "-device", f"{dev},chardev=vsock",  # the CID is the backend's --guest-cid
            "-kernel", f"{img}/vmlinuz", "-initrd", f"{img}/initramfs.cpio.gz",
            "-append", cmdline]

def wait_path(p, proc, limit=10.0):
    end = time.monotonic() + limit
    while not os.path.exists(p):
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{p} did not appear")
        time.sleep(0.01)

def one_boot(run):
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="capsem-smoke.") as d:
        procs = []
        res = {"first_init_line": None, "hello": None, "terminal": None, "poweroff": None}
        try:
            vs = subprocess.Popen([vsockd, "--guest-cid", "3", "--socket", f"{d}/vhost.sock",
                                   "--uds-path", f"{d}/vsock.sock"],
                                  stdout=subprocess.DEVNULL, stderr=open(f"{d}/vsockd.log", "w"))
            procs.append(vs)
            wait_path(f"{d}/vhost.sock", vs)
            ctl = socket.socket(socket.AF_UNIX); ctl.bind(f"{d}/vsock.sock_5000"); ctl.listen(4)
            term = socket.socket(socket.AF_UNIX); term.bind(f"{d}/vsock.sock_5001"); term.listen(4)
            cmd = qemu_cmd(d, token)
            if run == 0:
                print("qemu:", " ".join(cmd).replace(token, "TOKEN"), flush=True)
            t0 = time.monotonic()
            q = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            procs.append(q)
            serial = []
            def reader():
                for line in q.stdout:
                    t = time.monotonic() - t0
                    text = line.decode(errors="replace").rstrip()
                    serial.append(f"+{t:7.3f} {text}")
                    if res["first_init_line"] is None and "capsem-init:" in text:
                        res["first_init_line"] = t
                # qemu exited: wake a pending accept instead of waiting it out.
                if res["hello"] is None:
                    for s in (ctl, term):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
            th = threading.Thread(target=reader, daemon=True); th.start()
            ctl.settimeout(120)
            c, _ = ctl.accept(); c.settimeout(30)
            data = b""
            while not (b"hello" in data and token.encode() in data):
                chunk = c.recv(4096)
                if not chunk:
                    raise RuntimeError(f"control connection closed after {data!r}")
                data += chunk
                if len(data) > 65536:
                    raise RuntimeError("no hello in 64 KiB")
            res["hello"] = time.monotonic() - t0
            c.sendall(HELLO_ACK)
            term.settimeout(30)
            tc, _ = term.accept()
            res["terminal"] = time.monotonic() - t0
            c.sendall(SHUTDOWN)
            q.wait(timeout=60)
            res["poweroff"] = time.monotonic() - t0
            th.join(timeout=5)
            # Anything the agent sent after the hello (boot timings, exit).
            c.settimeout(1)
            try:
                while (chunk := c.recv(4096)):
                    data += chunk
            except (socket.timeout, OSError):
                pass
            res["boot_timings_seen"] = b"boot_timings" in data
            return res, serial
        except Exception as e:
            res["error"] = str(e)
            return res, serial if 'serial' in locals() else []
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.kill()
                p.wait()

results = []
for i in range(runs):
    res, serial = one_boot(i)
    results.append(res)
    fmt = lambda v: "-" if v is None else f"{v:.3f}s"
    print(f"{machine} run {i+1}: first init line {fmt(res['first_init_line'])}, hello {fmt(res['hello'])}, "
          f"terminal {fmt(res['terminal'])}, powered off {fmt(res['poweroff'])}"
          + (f", boot_timings {'yes' if res.get('boot_timings_seen') else 'no'}" if 'boot_timings_seen' in res else "")
          + (f"  ERROR: {res['error']}" if "error" in res else ""), flush=True)
    if "error" in res or os.environ.get("CAPSEM_SMOKE_SERIAL"):
        print("\n".join(serial[-60:]))
    if "error" in res:
        sys.exit(1)
if runs > 1:
    med = {k: statistics.median(r[k] for r in results) for k in ("first_init_line", "hello", "poweroff")}
    print(f"{machine} median of {runs}: first init line {med['first_init_line']:.3f}s, "
          f"hello {med['hello']:.3f}s, powered off {med['poweroff']:.3f}s")
PY
