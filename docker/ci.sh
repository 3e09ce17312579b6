#!/usr/bin/env bash
# Build docker/Dockerfile and run its checks (the `check` stage) without an NGC
# base or a Docker engine: podman, as root, on a CPU stand-in for the NGC base.
#
# The stand-in is Debian bookworm (debootstrap) with Python, PyPI's CPU build of
# torch relabelled the way NGC labels its builds (X.Y.0a0+...: a pre-release
# that no package index carries), and an NGC-like pip constraint file that pins
# every installed package, torch included (PIP_CONSTRAINT). It is kept in
# podman's image store, named by a digest of this script and the torch version,
# and made again only when either changes; podman also caches the Dockerfile's
# layers up to the repository copy.
#
# Exit status: 0 when the checks pass, or when this machine cannot build images
# at all (not root, no podman or debootstrap, no Debian mirror): that is
# printed as "image check skipped", and is no fault of the image. Any failure
# of the image build or of its checks fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION=//p' scripts/setup.sh)
# NGC: 2.6.0a0+ecf3bae40a and the like.
STANDIN_TORCH=${TORCH_VERSION}a0+cpu
BASE=localhost/megatron-reweight-standin:$(cat "$0" <(echo "$TORCH_VERSION") | sha256sum | cut -c1-12)

skip() {
    echo "image check skipped: $*" >&2
    exit 0
}

[[ $(id -u) == 0 ]] || skip "podman builds here need root"
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || skip "no $tool (apt-get install podman debootstrap)"
done

# make_base WORKDIR: the stand-in base image, made in WORKDIR.
make_base() {
    local work=$1 root=$1/root site
    debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 || {
        tail -n 5 "$work/debootstrap.log" >&2
        return 1
    }
    # This machine's pip fetches the wheels (its configuration finds the CPU torch build) ...
    "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$root/tmp/wheels" \
        "torch==${TORCH_VERSION}+cpu" numpy psutil packaging || return 1
    # ... and the stand-in installs them like NGC's Python: into the system, with pip.
    rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
    chroot "$root" python -m pip install --quiet --root-user-action=ignore --no-index \
        --find-links /tmp/wheels "torch==${TORCH_VERSION}+cpu" numpy psutil packaging || return 1
    rm -rf "$root/tmp/wheels" "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    site=$(chroot "$root" python -c 'import sysconfig; print(sysconfig.get_path("purelib", "posix_local"))')
    relabel_torch "$root$site" "${TORCH_VERSION}+cpu" "$STANDIN_TORCH" || return 1
    mkdir -p "$root/etc/pip"
    chroot "$root" python -m pip freeze >"$root/etc/pip/constraint.txt" || return 1
    grep -qx "torch==$STANDIN_TORCH" "$root/etc/pip/constraint.txt" || return 1
    tar -C "$root" -c . | podman import --quiet \
        --change "ENV PIP_CONSTRAINT=/etc/pip/constraint.txt" --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
}

# Give the installed torch in SITE the version NEW instead of OLD: its
# version.py, its dist-info's name and METADATA, and their RECORD entries.
relabel_torch() {
    "$PYTHON" - "$@" <<'PY'
import base64, hashlib, pathlib, sys

site, old, new = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
info = site / f"torch-{old}.dist-info"
edits = {
    "torch/version.py": (f"__version__ = '{old}'", f"__version__ = '{new}'"),
    f"torch-{new}.dist-info/METADATA": (f"\nVersion: {old}\n", f"\nVersion: {new}\n"),
}
info.rename(site / f"torch-{new}.dist-info")
for name, (before, after) in edits.items():
    path = site / name
    text = path.read_text()
    assert before in text, f"{before!r} not in {path}"
    path.write_text(text.replace(before, after, 1))
for cached in (site / "torch/__pycache__").glob("version.*.pyc"):
    cached.unlink()
record_path = site / f"torch-{new}.dist-info/RECORD"
rows = []
for row in record_path.read_text().splitlines():
    name = row.split(",")[0].replace(f"torch-{old}.dist-info/", f"torch-{new}.dist-info/")
    if name in edits:
        data = (site / name).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        row = f"{name},sha256={digest},{len(data)}"
    elif not name.startswith("torch/__pycache__/version."):
        row = name + row[len(row.split(",")[0]):]
    else:
        continue
    rows.append(row)
record_path.write_text("\n".join(rows) + "\n")
PY
}

if podman image exists "$BASE"; then
    echo "stand-in base: $BASE (cached)"
else
    echo "stand-in base: making $BASE (Debian bookworm, torch $STANDIN_TORCH)"
    start=$SECONDS
    work=$(mktemp -d /var/tmp/megatron-reweight-standin.XXXXXX)
    made=0
    make_base "$work" && made=1
    rm -rf "$work"
    ((made)) || skip "could not make the stand-in base image (see above)"
    echo "stand-in base: made in $((SECONDS - start)) s"
fi

# The host's CA bundle: pip in the build reaches the package index through it.
cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
volumes=()
[[ -f $cert ]] && volumes=(--volume "$cert:/etc/ssl/certs/ca-certificates.crt:ro")
start=$SECONDS
podman build --isolation chroot --file docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore \
    --build-arg BASE_IMAGE="$BASE" --build-arg REQUIRE_TRANSFORMER_ENGINE=0 "${volumes[@]}" \
    --target check --tag localhost/megatron-reweight-check .
echo "image check passed in $((SECONDS - start)) s (podman build --target check on $BASE)"
