"""The README's commands work as written for a new user in a fresh shell."""

import json
import re
import tomllib

from tests.helpers import REPO

ACTIVATE = "source .venv/bin/activate"


def _commands(markdown: str) -> list[tuple[int, str]]:
    """(offset in the text, command line) of each command of the bash blocks, continuations joined."""
    found = []
    for block in re.finditer(r"```bash\n(.*?)```", markdown, re.S):
        for command in re.split(r"(?<!\\)\n", block[1]):
            command = command.replace("\\\n", " ").strip()
            if command and not command.startswith("#"):
                found.append((block.start(), command))
    return found


def _program(command: str) -> str:
    """The program a shell command line runs (after any VAR=value assignments)."""
    words = [word for word in command.split() if not re.fullmatch(r"[A-Z_]+=\S*", word)]
    return words[0] if words else ""


def test_readme_activates_the_venv_before_running_its_programs_by_name():
    """A bare `torchrun`, `megatron-reweight-prepare`, `lm_eval` (any program of the virtual
    environment that scripts/setup.sh makes, or a console script of the package) is "command not
    found" in a fresh shell: the README says to activate the environment before the first one."""
    readme = (REPO / "README.md").read_text()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    venv_bin = REPO / ".venv" / "bin"
    programs = set(scripts) | ({path.name for path in venv_bin.iterdir()} if venv_bin.is_dir() else set())
    programs |= {"python", "torchrun", "lm_eval"}
    bare = [(offset, command) for offset, command in _commands(readme) if _program(command) in programs]
    assert any(_program(command) in ("torchrun", "lm_eval") for _, command in bare)  # the check sees them
    activated = readme.find(ACTIVATE)
    assert activated >= 0, f"the README runs {bare[0][1]!r} without saying {ACTIVATE}"
    early = [command for offset, command in bare if offset < activated]
    assert not early, f"run before the README says {ACTIVATE}: {early}"
    # The newcomer's first commands need no activation.
    assert "bash scripts/setup.sh && .venv/bin/python pretrain_llama.py" in readme[:activated]


def test_theorem_1_bound_is_named_as_linuppers_where_the_max_weight_is_explained():
    """Quadratic and Extremes can put more than 2/b on a sample (max w*b above 2): the <= 2 that the
    README and the results pages print beside that number is Theorem 1's assumption, which paper 1
    shows LinUpper keeping, not a promise of every strategy."""
    texts = {path: path.read_text() for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]}
    for path, text in texts.items():
        assert "Theorem 1 asks for" not in text, path  # the old label, read as a bound of every strategy
    label = re.search(r"`max weight x batch` \((.*?)`min weight x batch`", texts[REPO / "README.md"], re.S)[1]
    assert "LinUpper" in label and "Quadratic" in label, label


def test_readme_overhead_is_the_measured_step_ratio_at_each_data_parallel_size():
    """The README and the papers table sum up docs/results/overhead.json: the range of the
    strategies' median step / plain ratios, at DP=1 and at DP=2 (not DP=1's "about 1%" for both)."""
    runs = json.loads((REPO / "docs" / "results" / "overhead.json").read_text())["runs"]
    for path in (REPO / "README.md", REPO / "docs" / "results.md"):
        text = " ".join(path.read_text().split())
        for run in runs:
            ratios = [v["step_ratio_to_plain"]["median"] for name, v in run["variants"].items() if name != "plain-repeat"
                      and "step_ratio_to_plain" in v]  # fmt: skip
            expected = f"{(min(ratios) - 1) * 100:.1f}-{(max(ratios) - 1) * 100:.1f}%"
            assert re.search(rf"{re.escape(expected)}[^;|]*?at DP={run['data_parallel_size']}", text), (path, expected)


def test_architecture_names_every_module_and_walks_the_global_batch_window():
    text = (REPO / "docs" / "architecture.md").read_text()
    package = REPO / "megatron_reweight"
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if path.name != "__init__.py":
            assert path.name in text, relative
        if len(relative.parts) > 1:
            assert f"{relative.parts[0]}/" in text, relative.parts[0]
    step = text[text.index("## One training step") :]
    assert "window.forward_backward" in step and "pass 2" in step  # the global-batch window's two passes
