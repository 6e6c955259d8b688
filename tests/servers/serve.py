#!/usr/bin/env python3
"""Loopback servers for the network tests (tests/tests/netreal_qemu.rs).

    serve.py static DIR            HTTP/1.1, files under DIR
    serve.py tls DIR CERT KEY      the same over TLS with CERT/KEY
    serve.py git ROOT              git's smart HTTP (git http-backend) for
                                   the bare repositories under ROOT
    serve.py pypi DIR              a PEP 503 simple index in DIR holding one
                                   wheel it makes (capsemdemo 1.0)

Each binds 127.0.0.1 on a free port, prints the port on one line, then
serves until killed. Only ever loopback: nothing else is listened on.
"""
import functools
import http.server
import os
import ssl
import subprocess
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def static(directory, wrap=None):
    handler = functools.partial(Quiet, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if wrap:
        server.socket = wrap(server.socket)
    announce(server.server_address[1])
    server.serve_forever()


def git(root):
    """git http-backend as a WSGI app: the smart protocol, as a git host."""

    def app(environ, start_response):
        env = {
            "GIT_PROJECT_ROOT": root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        for key in ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
                    "CONTENT_LENGTH", "REMOTE_ADDR", "HTTP_GIT_PROTOCOL"):
            if environ.get(key):
                env[key] = environ[key]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        out = subprocess.run(["git", "http-backend"], input=body, env=env,
                             capture_output=True, check=False).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status = "200 OK"
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            if not line:
                continue
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = value.strip()
            else:
                headers.append((key, value.strip()))
        start_response(status, headers)
        return [rest]

    class Threading(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietWsgi(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, app, server_class=Threading,
                         handler_class=QuietWsgi)
    announce(server.server_address[1])
    server.serve_forever()


def pypi(directory):
    """Writes the wheel and its simple index, then serves them."""
    import base64
    import hashlib
    import zipfile

    name = "capsemdemo-1.0-py3-none-any.whl"
    files = {
        "capsemdemo/__init__.py": b"ANSWER = 42\n",
        "capsemdemo-1.0.dist-info/METADATA":
            b"Metadata-Version: 2.1\nName: capsemdemo\nVersion: 1.0\n",
        "capsemdemo-1.0.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: capsem-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(data)}")
    record.append("capsemdemo-1.0.dist-info/RECORD,,")
    files["capsemdemo-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    project = os.path.join(directory, "simple", "capsemdemo")
    os.makedirs(project, exist_ok=True)
    wheel = os.path.join(project, name)
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    with open(wheel, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(project, "index.html"), "w") as f:
        f.write(f'<!DOCTYPE html><html><body><a href="{name}#sha256={sha}">{name}</a></body></html>\n')
    with open(os.path.join(directory, "simple", "index.html"), "w") as f:
        f.write('<!DOCTYPE html><html><body><a href="capsemdemo/">capsemdemo</a></body></html>\n')
    static(directory)


def announce(port):
    print(port, flush=True)


def main():
    mode = sys.argv[1]
    if mode == "static":
        static(sys.argv[2])
    elif mode == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[3], sys.argv[4])
        static(sys.argv[2], lambda s: ctx.wrap_socket(s, server_side=True))
    elif mode == "git":
        git(sys.argv[2])
    elif mode == "pypi":
        pypi(sys.argv[2])
    else:
        sys.exit(f"serve.py: unknown mode {mode}")


if __name__ == "__main__":
    main()
