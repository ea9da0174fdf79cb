"""Every command in the README runs as written (so the README cannot drift)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import EXAMPLES, ROOT

README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)


def bioconf_commands() -> list[list[str]]:
    """The `bioconf ...` lines of the bash blocks, comments dropped; checkpoints are made first."""
    commands = [
        shlex.split(line.split("#")[0])
        for block in blocks("bash")
        for line in block.splitlines()
        if line.startswith("bioconf ")
    ]
    return sorted(commands, key=lambda words: words[1] != "init-checkpoint")


def test_readme_has_the_set_up_commands_first():
    first, second = blocks("bash")[0].splitlines()[:2]
    assert first.startswith("make demo") and second.startswith("make test")


def test_every_bioconf_command_in_the_readme_succeeds(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    bioconf = str(Path(sys.executable).with_name("bioconf"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = bioconf_commands()
    assert len(commands) >= 6
    for words in commands:
        result = subprocess.run(
            [bioconf, *words[1:]], cwd=tmp_path, capture_output=True, env=env, timeout=300
        )
        assert result.returncode == 0, f"{shlex.join(words)}: {result.stderr.decode()[-2000:]}"


def test_python_snippets_run(tmp_path, monkeypatch):
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for snippet in blocks("python"):
        exec(compile(snippet, "README.md", "exec"), {})
