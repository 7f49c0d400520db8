#!/usr/bin/env python3
"""Run hand-made mutants: each one small edit (an exact text and its replacement) applied
alone to a copy of the repository's tracked files, the tests given run against it, the edit
undone. A mutant is killed when the tests fail (a hang fails at pytest-timeout's 120 s);
the tests must pass first without any. For refusals, bounds and fallbacks whose
tests need real processes, where mutmut would take hours (docs/testing.md).

    .venv/bin/python scripts/hand_mutants.py scripts/mutant_lists/target.py -- tests/unit/test_target_files.py

A list is a Python file defining MUTANTS = [(name, path, old text, new text), ...]; the
old text must occur exactly once in the file.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 1:
        print("usage: hand_mutants.py LIST -- PYTEST-ARGS...", file=sys.stderr)
        return 2
    mutants = runpy.run_path(argv[0])["MUTANTS"]
    tree = tempfile.mkdtemp(prefix="ctprofd-mutants-")
    try:
        files = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], capture_output=True,
                               check=True).stdout.decode().split("\0")
        for name in filter(None, files):
            os.makedirs(os.path.join(tree, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(tree, name),
                         follow_symlinks=False)
        os.chmod(tree, 0o755)  # mkdtemp's 0700 would keep ctprofd's unprivileged readers out
        if _pytest(tree, argv[2:]).returncode != 0:  # else every mutant would count as killed
            print(f"{argv[0]}: the tests fail without any mutant", file=sys.stderr)
            return 2
        killed = 0
        for name, path, old, new in mutants:
            full = os.path.join(tree, path)
            with open(full) as f:
                text = f.read()
            if text.count(old) != 1:
                print(f"{argv[0]}: {name}: the text to change occurs {text.count(old)} times "
                      f"in {path}", file=sys.stderr)
                return 2
            with open(full, "w") as f:
                f.write(text.replace(old, new))
            try:
                result = _pytest(tree, argv[2:])
            finally:
                with open(full, "w") as f:
                    f.write(text)
            killed += result.returncode != 0
            print(f"{'killed  ' if result.returncode else 'SURVIVED'} {name}"
                  f"{_first_failure(result.stdout)}", flush=True)
        print(f"{killed}/{len(mutants)} killed")
        return 0
    finally:
        shutil.rmtree(tree)


def _pytest(tree: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           "--timeout", "120", "-rfE", *args], cwd=tree, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _first_failure(output: str) -> str:
    """' by TEST' for the test that killed a mutant (to tell a kill from a flaky test)."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return f" by {line.split()[1]}"
    return ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
