"""Run ``gapkern ARGS`` on a full disk, then again once space is freed (issue 17 item 14).

    unshare -rm python tests/disk_full.py '{"mount": M, "free": BYTES, "copy": C, "first": ARGS, "again": ARGS}'

Inside a private mount namespace (``unshare -rm``: no privilege needed where user namespaces are allowed) a
small tmpfs is mounted on M and filled by a filler file up to BYTES of free space; the first ARGS (whose output
lies under M) run, M is copied to C/full (what a run that hit the full disk left), the filler is removed
("space is freed"), the second ARGS run and M is copied to C/freed. The tmpfs goes with the namespace,
hence the copies. Prints one JSON object: the two runs' exit status and stderr.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

FILLER = ".filler"


def fill(mount: str, free: int) -> None:
    """Write zeros into MOUNT/.filler until the device is full, then give back ``free`` bytes."""
    path = os.path.join(mount, FILLER)
    with open(path, "wb", buffering=0) as f:
        block = bytes(1 << 16)
        try:
            while True:
                f.write(block)
        except OSError:
            pass
    os.truncate(path, max(os.path.getsize(path) - free, 0))


def run(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "gapkern.cli", *argv], capture_output=True, text=True)
    return {"rc": done.returncode, "stderr": done.stderr}


def copy(mount: str, to: str) -> None:
    shutil.copytree(mount, to, ignore=lambda folder, names: [FILLER] if folder == mount else [])


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    mount = job["mount"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mount], check=True)
    fill(mount, job["free"])
    full = run(job["first"])
    copy(mount, os.path.join(job["copy"], "full"))
    os.remove(os.path.join(mount, FILLER))
    freed = run(job["again"])
    copy(mount, os.path.join(job["copy"], "freed"))
    print(json.dumps({"full": full, "freed": freed}))
