"""The README's two commands stay true: CI runs the README's test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [[l for l in b.splitlines() if l.strip() and not l.startswith("#")] for b in blocks]


def test_readme_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2 and all(len(c) == 1 for c in cmds)


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert _readme_commands()[1][0] in ci.splitlines()


def test_main_command_flagfile_exists():
    flagfile = re.search(r"--flagfile=(\S+)", _readme_commands()[0][0]).group(1)
    assert os.path.exists(os.path.join(ROOT, flagfile))
