"""Record the installed torch build, or check that it is still the recorded one.

    python torch_identity.py record FILE     # in the base image, before our layers
    python torch_identity.py compare FILE    # in the finished image

A build is identified by its version and by the digest of its RECORD, the list
of every installed file with its hash: reinstalling torch, from any index,
changes it. NGC images also pin their torch in the pip constraint file named by
PIP_CONSTRAINT; where one does, the installed version must be the pinned one.
"""

import hashlib
import os
import re
import sys
from importlib import metadata


def identity() -> str:
    torch = metadata.distribution("torch")
    record = torch.read_text("RECORD") or ""
    return f"torch {torch.version} RECORD sha256 {hashlib.sha256(record.encode()).hexdigest()}"


def constraint_pin() -> str | None:
    path = os.environ.get("PIP_CONSTRAINT")
    if not path or not os.path.isfile(path):
        return None
    for line in open(path):
        match = re.match(r"\s*torch\s*==\s*(\S+)", line)
        if match:
            return match.group(1)
    return None


def main(action: str, path: str) -> int:
    if action == "record":
        with open(path, "w") as file:
            file.write(identity() + "\n")
        return 0
    base, now = open(path).read().strip(), identity()
    if now != base:
        print(f"error: the image's torch is not the base image's: {now} (base: {base}); "
              "install our layers with --no-deps so that pip keeps the base's torch", file=sys.stderr)  # fmt: skip
        return 1
    version = metadata.version("torch")
    pin = constraint_pin()
    if pin is not None and pin != version:
        print(f"error: torch {version} is installed but {os.environ['PIP_CONSTRAINT']} pins {pin}", file=sys.stderr)
        return 1
    print(f"{now}: the base image's build" + (f", as {os.environ['PIP_CONSTRAINT']} pins" if pin else ""))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("record", "compare"):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
