"""Small helpers shared by the deployment tests and the checks from outside."""

import json
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dockerfile_instruction(name, path=ROOT / "Dockerfile"):
    """Return the JSON-array argument of the last NAME instruction (CMD, HEALTHCHECK ... CMD)."""
    text = path.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(name + " ")]
    assert lines, f"no {name} in {path}"
    return json.loads(lines[-1][lines[-1].index("[") :])
