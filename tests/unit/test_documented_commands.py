"""Every command the docs name exists and answers `--help`.

The commands are read from the docs themselves (README.md, BENCHMARKS.md, docs/**/*.md: fenced blocks and inline code) and from the
Makefile's recipes, so a new mention is covered without touching this file:

- `gprl <command> [<subcommand>]` -> the command is registered and `gprl ... --help` exits 0;
- `make <target>` -> the Makefile has the target and `make -n <target>` (a dry run) succeeds;
- `python -m gprl...` / `python -m gprl_operator` / `python -m benchmarks...` -> `--help` exits 0;
- `python <script>.py --flag …` for a script of this repository -> its `--help` exits 0 and lists every flag named.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gprl import cli

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]
MAKEFILE = REPO / "Makefile"
OWN_MODULES = re.compile(r"^(gprl(\.[a-z_]+)*|gprl_operator|benchmarks(\.[a-z_]+)*)$")
WORD = re.compile(r"^[a-z][a-z0-9-]*$")


def code_snippets(markdown: str) -> list[str]:
    """The contents of fenced code blocks, then of inline code spans outside them."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    return fenced + re.findall(r"`((?:[^`\n]|\n(?!\n))+)`", prose)  # a span may wrap onto the next line


def shell_commands(snippet: str) -> list[list[str]]:
    """Each simple command of a snippet as words: prompts, comments, env assignments and `|`/`&&`/`;` split off."""
    out = []
    for line in snippet.splitlines():
        line = re.sub(r"^\s*\$\s+", "", line)
        line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
        for part in re.split(r"\|\||&&|[|;]|\$\(|`", line):
            try:
                words = shlex.split(part)
            except ValueError:
                words = part.split()
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]
            if words:
                out.append(words)
    return out


def documented() -> tuple[dict, dict, dict, dict]:
    """(gprl command paths, make targets, python modules, (script, flags)) -> the first place each is named."""
    sources = [(p, code_snippets(p.read_text())) for p in DOCS]
    # the Makefile's recipes (lines starting with a tab) are commands too
    sources.append((MAKEFILE, [ln for ln in MAKEFILE.read_text().splitlines() if ln.startswith("\t")]))
    gprl_cmds, make_targets, modules, scripts = {}, {}, {}, {}
    for path, snippets in sources:
        where = str(path.relative_to(REPO))
        for snippet in snippets:
            for words in shell_commands(snippet):
                head = words[0]
                if head == "gprl" or head.endswith("/bin/gprl"):
                    sub = []
                    for w in words[1:3]:
                        if not WORD.match(w):
                            break
                        sub.append(w)
                    gprl_cmds.setdefault(tuple(sub), where)
                elif head == "make" and len(words) > 1 and WORD.match(words[1]):
                    make_targets.setdefault(words[1], where)
                elif re.match(r"^(.*/)?python[0-9.]*$", head) and len(words) > 2 and words[1] == "-m" \
                        and OWN_MODULES.match(words[2]):
                    modules.setdefault(words[2], where)
                elif re.match(r"^(.*/)?python[0-9.]*$", head) and len(words) > 1 and words[1].endswith(".py") \
                        and (REPO / words[1]).is_file():
                    flags = {w.split("=")[0] for w in words[2:] if re.match(r"^--[a-z][a-z0-9-]*", w)}
                    scripts.setdefault(words[1], {}).setdefault(where, set()).update(flags)
    return gprl_cmds, make_targets, modules, scripts


GPRL_CMDS, MAKE_TARGETS, MODULES, SCRIPTS = documented()


def _resolve(words: tuple[str, ...]) -> list[str]:
    """The registered command path the words name (`gprl train run.yaml` -> [train]); fails on an unknown command."""
    parser, path = cli.build_parser(), []
    for w in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        choices = subs[0].choices
        assert w in choices, f"`gprl {' '.join(path + [w])}` is named in the docs but is not a command " \
                             f"(known: {', '.join(sorted(choices))})"
        path.append(w)
        parser = choices[w]
    return path


def test_the_docs_name_commands():
    """The parser sees what the docs show (guards against a parser that silently finds nothing)."""
    assert ("dev-cluster",) in GPRL_CMDS and ("train",) in GPRL_CMDS and ("gpm", "train") in GPRL_CMDS
    assert {"demo", "test", "dev-cluster"} <= set(MAKE_TARGETS)
    assert "gprl_operator" in MODULES


@pytest.mark.parametrize("words", sorted(GPRL_CMDS), ids=lambda w: "gprl " + " ".join(w))
def test_gprl_command_help(words, capsys):
    path = _resolve(words)
    with pytest.raises(SystemExit) as exc:
        cli.main([*path, "--help"])
    assert exc.value.code == 0, f"`gprl {' '.join(path)} --help` (named in {GPRL_CMDS[words]}) failed"
    assert "usage:" in capsys.readouterr().out


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", MAKEFILE.read_text(), flags=re.M))


@pytest.mark.parametrize("target", sorted(MAKE_TARGETS))
def test_make_target_exists_and_dry_runs(target):
    assert target in _make_targets(), f"`make {target}` is named in {MAKE_TARGETS[target]} but the Makefile lacks it"
    # VENV given on the command line: the Makefile's `$(shell scripts/bootstrap.sh)` is not evaluated
    r = subprocess.run(["make", "-n", f"VENV={sys.prefix}", target], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_make_help_lists_every_target():
    r = subprocess.run(["make", f"VENV={sys.prefix}", "help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listed = {ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()}
    assert _make_targets() - {"help"} <= listed, r.stdout


@pytest.mark.parametrize("module", sorted(MODULES))
def test_python_module_help(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "operator"),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), \
        f"`python -m {module} --help` (named in {MODULES[module]}) failed: {r.stderr[-2000:]}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_python_script_help_lists_the_documented_flags(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), f"`python {script} --help` failed: {r.stderr[-2000:]}"
    for where, flags in SCRIPTS[script].items():
        missing = sorted(f for f in flags if not re.search(re.escape(f) + r"\b", r.stdout))
        assert not missing, f"{where} runs `python {script}` with {missing}, which its --help does not list"
