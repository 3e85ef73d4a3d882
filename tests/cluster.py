"""Debian's nginx with the shipped nginx/nginx.conf in front of app processes
on 127.0.0.1: what compose's `nginx` service does, without Docker.

Only the `listen` port and the upstream's `server` lines are changed (the
shipped file names the compose service, `app:8080`, and re-resolves it).
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "nginx" / "nginx.conf"


def nginx_binary():
    """Path of Debian's nginx, or None."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def render_config(port, upstream_ports):
    """The shipped config with its listen port and upstream servers replaced."""
    text = NGINX_CONF.read_text()
    text, listens = re.subn(r"^(\s*)listen 8080;", rf"\1listen 127.0.0.1:{port};", text, flags=re.M)
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in upstream_ports)
    text, upstreams = re.subn(r"^\s*server app:8080 [^;]*;\n", servers, text, flags=re.M)
    assert listens == 1 and upstreams == 1, "nginx/nginx.conf no longer has the lines the tests replace"
    return text


class Nginx:
    """nginx in the foreground with the rendered config; .base is its URL."""

    def __init__(self, port, upstream_ports):
        self.port, self.base = port, f"http://127.0.0.1:{port}"
        self.folder = Path(tempfile.mkdtemp(prefix="whoknows-nginx-"))
        self.folder.chmod(0o755)
        self.conf = self.folder / "nginx.conf"
        self.conf.write_text(render_config(port, upstream_ports))
        self.log = open(self.folder / "output.log", "w+")  # noqa: SIM115
        self.process = None

    def command(self, *extra):
        return [nginx_binary(), "-p", str(self.folder), "-c", str(self.conf), "-e", "stderr", *extra]

    def check(self):
        """Return `nginx -t` on the rendered config: (exit status, output)."""
        done = subprocess.run(
            self.command("-t", "-g", f"pid {self.folder}/nginx.pid;"), capture_output=True, text=True, timeout=30
        )
        return done.returncode, done.stdout + done.stderr

    def start(self, wait=15):
        """Start it and wait until it answers."""
        self.process = subprocess.Popen(
            self.command("-g", f"daemon off; pid {self.folder}/nginx.pid;"), stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + wait
        while True:
            try:
                urllib.request.urlopen(f"{self.base}/about", timeout=2).close()
                return self
            except urllib.error.HTTPError:
                return self  # nginx answers (an app process may not yet)
            except OSError:
                assert self.process.poll() is None, self.output()
                assert time.monotonic() < deadline, "nginx did not start: " + self.output()
                time.sleep(0.1)

    def output(self):
        self.log.flush()
        return (self.folder / "output.log").read_text(errors="replace")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
