"""scripts/setup.sh, where the CPU build of torch cannot be fetched."""

import re
import shutil
import subprocess

from tests.helpers import REPO

# pip as it fails without a network: the reason is a WARNING, which --quiet hides; the ERROR alone
# ("from versions: none") does not say why.
FAKE_PYTHON = """#!{bash}
case "$*" in
    *"--upgrade pip"*) exit 0 ;;
    *torch*)
        [[ " $* " == *" --quiet "* || " $* " == *" -q "* ]] || echo "WARNING: Retrying (Retry(total=0)) after \\
connection broken by 'NewConnectionError(Failed to establish a new connection: [Errno 101] Network is unreachable)'" >&2
        echo "ERROR: Could not find a version that satisfies the requirement $3 (from versions: none)" >&2
        exit 1 ;;
esac
exit 0
"""


def test_setup_script_says_why_the_cpu_torch_wheel_failed_and_what_to_set(tmp_path):
    version = re.search(r"^TORCH_VERSION=(\S+)$", (REPO / "scripts" / "setup.sh").read_text(), re.M)[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON.format(bash=shutil.which("bash")))
    python.chmod(0o755)
    # The tools the script uses, and no nvidia-smi: the CPU path.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "mktemp", "grep", "tail", "rm"):
        (tools / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [shutil.which("bash"), str(tmp_path / "scripts" / "setup.sh")], env={"PATH": str(tools)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "environment ready" not in result.stdout
    lines = result.stderr.splitlines()
    assert lines[0] == (
        f"error: could not install the CPU build of torch {version} (from https://download.pytorch.org/whl/cpu); pip said:"
    )
    assert any("Network is unreachable" in line for line in lines)  # the reason
    assert "Set TORCH_CPU_INDEX" in lines[-1]  # what to set
