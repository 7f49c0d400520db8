"""ctprofd on Debian 12's own packages of its libraries, the floors in pyproject.toml and what
the .deb depends on: the unit tests, the machine-code matrix (capstone 4 decoding every build's
fast paths) and the other tests that need no daemon run again in .venv-debian, which
scripts/setup.sh --test creates with --system-site-packages over Debian's python3-* packages.
The rest of the suite runs on the newest releases in .venv."""

from __future__ import annotations

import re
import subprocess
import tomllib

from support.machines import REPO

DEBIAN_VENV = REPO / ".venv-debian"
# distribution name -> the module Debian's package installs
MODULES = {"prometheus-client": "prometheus_client", "pyelftools": "elftools", "pyyaml": "yaml",
           "bcrypt": "bcrypt", "capstone": "capstone"}
TESTS = ["tests/unit", "tests/test_config.py", "tests/test_web.py", "tests/test_collector.py",
         "tests/test_labels.py", "tests/test_selection.py", "tests/test_fuzz_elf.py",
         "tests/test_machine_code.py", "tests/test_code_matrix.py"]


def floors() -> dict[str, str]:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split(">=") for d in dependencies)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def test_the_debian_venv_imports_debians_packages_at_the_floors():
    assert set(floors()) == set(MODULES)
    probe = ("import importlib, importlib.metadata as m, sys\n"
             "for dist, module in (a.split('=') for a in sys.argv[1:]):\n"
             "    print(dist, m.version(dist), importlib.import_module(module).__file__)\n")
    out = subprocess.run([str(DEBIAN_VENV / "bin" / "python"), "-c", probe,
                          *(f"{d}={m}" for d, m in MODULES.items()), "systemd-python=systemd"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = {dist: (version, path) for dist, version, path in map(str.split,
                                                                   out.stdout.splitlines())}
    for dist, (version, path) in found.items():
        assert path.startswith("/usr/lib/python3/dist-packages/"), (dist, path)
        owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        assert owner.returncode == 0 and owner.stdout.startswith("python3-"), (dist, owner)
        if dist in MODULES:
            assert version_tuple(version) >= version_tuple(floors()[dist]), (dist, version)
    # the floors are bookworm's own versions, not just below them
    assert found["capstone"][0].startswith("4.") and found["bcrypt"][0].startswith("3.")


def test_the_pure_tests_pass_on_debians_libraries():
    result = subprocess.run([str(DEBIAN_VENV / "bin" / "python"), "-m", "pytest", "-q",
                             "-p", "no:cacheprovider", *TESTS],
                            cwd=REPO, capture_output=True, text=True, timeout=1800)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    # none skipped, none failed
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), summary
