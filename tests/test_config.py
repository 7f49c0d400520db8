"""Config validation: defaults, one-line errors naming file and key, the selection predicate."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from ctprofd import cli
from ctprofd.config import settings as config
from ctprofd.procfs.processes import ProcessInfo, StatLine

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ctprofd.yaml"
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message[len(path) + 2:]


def test_embedded_default_is_the_repo_file():
    assert config.EMBEDDED_DEFAULT.is_symlink()
    assert os.readlink(config.EMBEDDED_DEFAULT) == "../../config/ctprofd.yaml"
    assert config.EMBEDDED_DEFAULT.resolve() == REPO / "config" / "ctprofd.yaml"


def test_embedded_default_equals_dataclass_defaults():
    default = config.load_default()
    assert default == config.Config()
    assert default.source == str(config.EMBEDDED_DEFAULT)


def test_every_key_is_documented_in_the_default_file():
    text = (REPO / "config" / "ctprofd.yaml").read_text()
    for name in config.Config.__dataclass_fields__:
        if name != "source":
            assert f"\n{name}:" in text, name


def test_empty_file_gives_defaults(tmp_path):
    assert config.load(write(tmp_path, "")) == config.Config()


def test_values_are_read(tmp_path):
    cfg = config.load(write(tmp_path, """
listen: "127.0.0.1:9999"
interval: 2.5
cache_dir: null
labels: [comm, user]
max_series: 5
selection:
  include: {comm: ["^redis"], uid: [0]}
  exclude: {exe: ["/usr/bin/*"]}
debuginfod_urls: ["https://debuginfod.example/"]
"""))
    assert cfg.listen == ("127.0.0.1:9999",)
    assert cfg.interval == 2.5
    assert cfg.cache_dir is None
    assert cfg.labels == ("comm", "user")
    assert cfg.max_series == 5
    assert cfg.selection.include.comm[0].pattern == "^redis"
    assert cfg.selection.include.uid == (0,)
    assert cfg.selection.exclude.exe == ("/usr/bin/*",)
    assert cfg.debuginfod_urls == ("https://debuginfod.example/",)


@pytest.mark.parametrize("text, expected", [
    ("selection:\n  include:\n    comm: ['foo(']\n",
     "selection.include.comm[0]: invalid regex 'foo(': missing ), unterminated subpattern"),
    ("colour: red\n", "colour: unknown key"),
    ("selection:\n  exclude:\n    pid: [1]\n", "selection.exclude.pid: unknown key"),
    ("interval: fast\n", "interval: expected a number, got a string"),
    ("interval: 0\n", "interval: must be > 0"),
    ("interval: true\n", "interval: expected a number, got a boolean"),
    ("max_series: 1.5\n", "max_series: expected an integer, got a number"),
    ("max_series: 0\n", "max_series: must be >= 1, got 0"),
    ("labels: [pid, host]\n", "labels[1]: unknown label 'host'"),
    ("labels: [pid, pid]\n", "labels[1]: duplicate label 'pid'"),
    ("labels: pid\n", "labels: expected a list, got a string"),
    ("listen: 19455\n", "listen: expected a string, got an integer"),
    ("listen: 'localhost'\n", "listen: 'localhost' is not HOST:PORT"),
    ("listen: '::1:80'\n", "listen: '::1:80': put an IPv6 address in brackets"),
    ("debug_dirs: [/usr/lib/debug, 3]\n", "debug_dirs[1]: expected a string, got an integer"),
    ("debuginfod_urls: [ftp://x]\n", "debuginfod_urls[0]: not an http(s) URL"),
    ("selection:\n  include:\n    uid: [-1]\n", "selection.include.uid[0]: must be >= 0"),
    ("selection: []\n", "selection: expected a mapping, got a list"),
    ("log_level: loud\n", "log_level: must be one of debug, info, warn, error, warning"),
    ("listen: []\n", "listen: give at least one HOST:PORT"),
    ("listen: [':19455', '127.0.0.1:80', ':19455']\n",
     "listen[2]: duplicate listen address ':19455'"),
    ("state_dir: null\n", "state_dir: expected a string, got null"),
    ("parser:\n  timeout: 0\n", "parser.timeout: must be > 0"),
    ("parser:\n  memory_limit_mib: 10\n", "parser.memory_limit_mib: must be >= 64, got 10"),
    ("parser:\n  memory: 1\n", "parser.memory: unknown key"),
    ("- a\n- b\n", "expected a mapping at top level, got a list"),
    ("interval: [\n", "invalid YAML at line 2 column 1"),
    ("interval: 1\ninterval: 2\n", "invalid YAML at line 2 column 1: duplicate key 'interval'"),
    ("selection:\n  include: {uid: [1], uid: [2]}\n",
     "invalid YAML at line 2 column 23: duplicate key 'uid'"),
])
def test_errors_are_one_line_naming_file_and_key(tmp_path, text, expected):
    assert error_of(tmp_path, text).startswith(expected)


def test_unreadable_file(tmp_path):
    missing = str(tmp_path / "absent.yaml")
    with pytest.raises(config.ConfigError) as info:
        config.load(missing)
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"


def special_file(tmp_path: Path, kind: str) -> str:
    """A path naming something that is not a small regular file."""
    path = tmp_path / "ctprofd.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block without a writer
    elif kind == "device":
        path.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "directory":
        path.mkdir()
    else:
        with open(path, "wb") as f:
            f.truncate(config.MAX_CONFIG_BYTES + 1)  # sparse: huge to read, nothing on disk
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("fifo", "not a regular file (a FIFO)"), ("device", "not a regular file (a character "
    "device)"), ("directory", "not a regular file (a directory)"),
    ("huge", f"too large ({config.MAX_CONFIG_BYTES + 1} bytes, limit {config.MAX_CONFIG_BYTES})")])
def test_only_bounded_regular_files_are_read(tmp_path, kind, expected):
    path = special_file(tmp_path, kind)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: cannot read: {expected}"


def fake_process(root: Path, pid: int, comm: str, exe: str | None, uid: int,
                 unit: str) -> ProcessInfo:
    """A ProcessInfo over a hand-made /proc/PID tree (exe None = unreadable link)."""
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    cgroup = f"/system.slice/{unit}" if unit else "/user.slice"
    (d / "cgroup").write_text(f"0::{cgroup}\n")
    if exe is not None:
        (d / "exe").symlink_to(exe)
    return ProcessInfo(str(root), pid, StatLine(comm=comm, state="S", start_time=100 + pid))


def selected(tmp_path: Path, yaml_text: str, processes: list[ProcessInfo]) -> list[int]:
    select = config.load(write(tmp_path, yaml_text)).selection.selects
    return [p.pid for p in processes if select(p)]


@pytest.fixture
def processes(tmp_path):
    root = tmp_path / "proc"
    return [fake_process(root, 10, "redis-server", "/usr/bin/redis-server", 100,
                         "redis.service"),
            fake_process(root, 11, "envoy", "/opt/envoy/bin/envoy", 0, "envoy.service"),
            fake_process(root, 12, "bash", "/usr/bin/bash", 1000, ""),
            fake_process(root, 13, "ghost", None, 1000, "")]


def test_no_rules_selects_everything(tmp_path, processes):
    assert selected(tmp_path, "", processes) == [10, 11, 12, 13]


def test_include_any_rule_and_exclude_wins(tmp_path, processes):
    text = """
selection:
  include: {comm: ["^redis"], unit: ["envoy.*"], uid: [1000]}
  exclude: {exe: ["/usr/bin/b*"]}
"""
    assert selected(tmp_path, text, processes) == [10, 11, 13]


def test_exclude_only(tmp_path, processes):
    text = "selection:\n  exclude: {uid: [0], comm: ['^ba']}\n"
    assert selected(tmp_path, text, processes) == [10, 13]


def test_unreadable_exe_matches_no_glob(tmp_path, processes):
    assert selected(tmp_path, "selection:\n  include: {exe: ['*']}\n", processes) == [10, 11, 12]
    assert selected(tmp_path, "selection:\n  exclude: {exe: ['*']}\n", processes) == [13]


def test_check_config_reports_ok_or_error(tmp_path, capsys):
    good = write(tmp_path, "interval: 5\n")
    assert cli.cmd_check_config(argparse.Namespace(path=good)) == 0
    assert capsys.readouterr().out == f"{good}: OK\n"
    bad = write(tmp_path, "interval: -5\n")
    assert cli.cmd_check_config(argparse.Namespace(path=bad)) == config.EX_CONFIG
    assert capsys.readouterr().err == f"{bad}: interval: must be > 0, got -5\n"


def test_check_config_validates_the_web_config_it_names(tmp_path, capsys):
    web = tmp_path / "web.yaml"
    web.write_text("basic_auth_users:\n  alice: not-a-hash\n")
    path = write(tmp_path, f"web_config_file: {web}\n")
    assert cli.cmd_check_config(argparse.Namespace(path=path)) == config.EX_CONFIG
    assert capsys.readouterr().err.startswith(f"{web}: basic_auth_users.alice: ")


def test_add_check_config_parser_sets_func(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_check_config_parser(parser.add_subparsers())
    args = parser.parse_args(["check-config", write(tmp_path, "")])
    assert args.func(args) == 0


@pytest.mark.parametrize("text, expected", [
    ("offsets_files: 5\n", "offsets_files: expected a list, got an integer"),
    ("offsets_files: [5]\n", "offsets_files[0]: expected a string, got an integer"),
    ("series_retention: -1\n", "series_retention: must be >= 0, got -1"),
    ("series_retention: x\n", "series_retention: expected a number, got a string"),
    ("web_config_file: 5\n", "web_config_file: expected a string, got an integer"),
    ("cache_dir: 5\n", "cache_dir: expected a string, got an integer"),
    ("cache_dir: {a: 1}\n", "cache_dir: expected a string, got a mapping"),
    ("cache_dir: 2024-01-01\n", "cache_dir: expected a string, got date"),
    ("log_level: 5\n", "log_level: expected a string, got an integer"),
    ("debuginfod_urls: 5\n", "debuginfod_urls: expected a list, got an integer"),
    ("selection:\n  include: {comm: [5]}\n",
     "selection.include.comm[0]: expected a string, got an integer"),
    ("selection:\n  include: {exe: [5]}\n",
     "selection.include.exe[0]: expected a string, got an integer"),
    ("selection:\n  exclude: {unit: [5]}\n",
     "selection.exclude.unit[0]: expected a string, got an integer"),
    ("source: x\n", "source: unknown key (known: listen, interval, cache_dir, "
                     "cache_max_entries, cache_max_mib, state_dir, debug_dirs, debuginfod_urls, "
                     "offsets_files, parser, selection, labels, max_series, series_retention, "
                     "web_config_file, log_level)"),
    ("colour: red\n", "colour: unknown key (known: listen, interval, cache_dir, "
                      "cache_max_entries, cache_max_mib, state_dir, debug_dirs, debuginfod_urls, "
                      "offsets_files, parser, selection, labels, max_series, series_retention, "
                     "web_config_file, log_level)"),
    ("labels: [host]\n", "labels[0]: unknown label 'host' (choose from pid, comm, unit, exe, "
                         "user, container_id, pod_uid)"),
    ("interval: -1\n", "interval: must be > 0, got -1"),
    ("listen: 'h:abc'\n", "listen: 'h:abc' is not HOST:PORT with a port 0-65535"),
    ("? [a]\n: 1\n", "invalid YAML at line 1 column 3: found unhashable key"),
    ("selection:\n  ? {a: 1}\n  : 1\n", "invalid YAML at line 2 column 5: found unhashable key"),
    ("? [a]\n: 1\nb: 1\nb: 2\n", "invalid YAML at line 4 column 1: duplicate key 'b'"),
])
def test_every_key_is_named_in_its_error(tmp_path, text, expected):
    assert error_of(tmp_path, text) == expected


def test_more_values_are_read(tmp_path):
    path = write(tmp_path, "offsets_files: [/a.json, /b.json]\nseries_retention: 0\n"
                           "web_config_file: /etc/web.yaml\ncache_dir: /c\n")
    cfg = config.load(path)
    assert (cfg.offsets_files, cfg.series_retention, cfg.web_config_file, cfg.cache_dir,
            cfg.source) == (("/a.json", "/b.json"), 0.0, "/etc/web.yaml", "/c", path)
    assert config.load(write(tmp_path, "series_retention: 12.5\n")).series_retention == 12.5


def test_yaml_errors_name_the_problem_and_where(tmp_path):
    assert error_of(tmp_path, "interval: [\n") == (
        "invalid YAML at line 2 column 1: expected the node content, but found '<stream end>'")
    # a reader error has no mark and no `problem`: its first line says it
    assert error_of(tmp_path, "interval: 1\x07\n") == (
        "invalid YAML: unacceptable character #x0007: special characters are not allowed")


def test_config_error_keeps_its_parts(tmp_path):
    path = write(tmp_path, "interval: 0\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert (info.value.source, info.value.key, info.value.problem) == (
        path, "interval", "must be > 0, got 0")
    for text in ("[1]\n", "a: [\n"):  # file-level problems name no key
        with pytest.raises(config.ConfigError) as info:
            config.load(write(tmp_path, text))
        assert info.value.key == ""


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "ctprofd.yaml"
    path.write_bytes(b"interval: \xff\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}: cannot read: 'utf-8' codec can't decode byte")
    assert info.value.key == ""


def test_a_uid_or_unit_rule_alone_is_a_rule(tmp_path, processes):
    assert selected(tmp_path, "selection:\n  include: {uid: [1000]}\n", processes) == [12, 13]
    assert selected(tmp_path, "selection:\n  include: {unit: ['redis*']}\n", processes) == [10]


def test_check_config_help_names_its_argument_and_what_it_does():
    parser = argparse.ArgumentParser(prog="ctprofd")
    sub = cli.add_check_config_parser(parser.add_subparsers())
    assert "check-config validate a configuration file" in " ".join(parser.format_help().split())
    assert parser.parse_args(["check-config", "x"]).path == "x"
    help_text = " ".join(sub.format_help().split())
    assert help_text.startswith("usage: ctprofd check-config [-h] PATH")
    assert ("PATH the YAML configuration file" in help_text
            and "Validate a ctprofd configuration file (and the web config file it names); "
                "print OK or a one-line error. Exit 0, or 78 on a bad config." in help_text)


def test_load_effective_takes_the_path_else_the_system_file_else_the_default(tmp_path,
                                                                             monkeypatch):
    named = write(tmp_path, "interval: 3\n")
    system = tmp_path / "etc.yaml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(system))
    assert config.load_effective(None).source == str(config.EMBEDDED_DEFAULT)
    system.write_text("interval: 7\n")
    assert (config.load_effective(None).interval, config.load_effective(None).source) == (
        7.0, str(system))
    assert (config.load_effective(named).interval, config.load_effective(named).source) == (
        3.0, named)


def test_overrides_are_validated_as_their_key_and_named_by_their_flag(tmp_path):
    path = write(tmp_path, "interval: 5\nlisten: ':1'\n")
    over = config.load_effective(path, [config.Override("interval", 0.5, "--interval"),
                                        config.Override("debug_dirs", ["/d"], "--debug-dir"),
                                        config.Override("cache_dir", None, "--cache-dir")])
    assert (over.interval, over.debug_dirs, over.cache_dir, over.listen, over.source) == (
        0.5, ("/d",), None, (":1",), path)
    for override, message in (
            (config.Override("interval", 0, "--interval"), "--interval: must be > 0, got 0"),
            (config.Override("listen", ["1.2.3.4:5", "nowhere"], "--web.listen-address"),
             "--web.listen-address: [1]: 'nowhere' is not HOST:PORT with a port 0-65535"),
            (config.Override("log_level", "loud", "--log.level"),
             "--log.level: must be one of debug, info, warn, error, warning, got 'loud'")):
        with pytest.raises(config.ConfigError) as err:
            config.load_effective(path, [override])
        assert str(err.value) == message


def test_check_config_validates_the_offsets_files_it_names(tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"format": "ctprofd-offsets", "version": 1, "layouts": {}}')
    bad.write_text("{not json")
    path = write(tmp_path, f"offsets_files: [{good}]\n")
    assert cli.cmd_check_config(argparse.Namespace(path=path)) == 0
    assert capsys.readouterr().out == f"{path}: OK\n"
    path = write(tmp_path, f"offsets_files: [{good}, {bad}]\n")
    assert cli.cmd_check_config(argparse.Namespace(path=path)) == config.EX_CONFIG
    assert capsys.readouterr().err.startswith(f"{bad}: not JSON: ")


@pytest.mark.parametrize("text, expected", [
    ("interval: .nan\n", "interval: must be a finite number, got nan"),
    ("interval: .inf\n", "interval: must be a finite number, got inf"),
    ("interval: 86400.5\n", "interval: must be <= 86400, got 86400.5"),
])
def test_intervals_are_finite_and_at_most_a_day(tmp_path, text, expected):
    assert error_of(tmp_path, text) == expected


def test_an_interval_of_exactly_a_day_is_accepted(tmp_path):
    assert config.load(write(tmp_path, "interval: 86400\n")).interval == 86400.0
