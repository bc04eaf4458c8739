"""The ComfyUI hosts of devkit/hosts.json: where each lives and how to run its python (standard library only).

    python3 devkit/hosts.py list              # versions, default first
    python3 devkit/hosts.py default           # the default (current) version
    python3 devkit/hosts.py get 0.33.0 folder # one field (absolute for 'folder')
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOSTS_FILE = Path(__file__).resolve().with_name("hosts.json")


def _data() -> dict:
    return json.loads(HOSTS_FILE.read_text())


def default_version() -> str:
    return _data()["default"]


def versions() -> list[str]:
    """All tested host versions, the default (current) one first."""
    data = _data()
    return [data["default"], *(v for v in data["hosts"] if v != data["default"])]


def host(version: str | None = None) -> dict:
    data = _data()
    version = version or data["default"]
    if version not in data["hosts"]:
        raise SystemExit(f"unknown ComfyUI host {version!r}; known: {', '.join(versions())} (devkit/hosts.json)")
    return {"version": version, **data["hosts"][version]}


def host_folder(version: str | None = None) -> Path:
    """The host's folder: $LORARAR_HOST when set, else the folder hosts.json gives (venv/ and ComfyUI/ inside)."""
    env = os.environ.get("LORARAR_HOST")
    return Path(env) if env else REPO / host(version)["folder"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["list"]:
        print("\n".join(versions()))
        return 0
    if argv[:1] == ["default"]:
        print(default_version())
        return 0
    if len(argv) == 3 and argv[0] == "get":
        if argv[2] == "folder":
            print(REPO / host(argv[1])["folder"])
        else:
            value = host(argv[1]).get(argv[2], "")
            print(" ".join(value) if isinstance(value, list) else value)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
