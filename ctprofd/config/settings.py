"""The daemon's YAML configuration: frozen dataclasses, strict one-line validation errors,
overrides from the command line, and the process-selection predicate."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

from ..export.labels import LABEL_NAMES
from ..export.server import parse_listen
from ..files.regular import MAX_CONFIG_BYTES, read_regular

if TYPE_CHECKING:
    from ..procfs.processes import ProcessInfo

DEFAULT_PATH = "/etc/ctprofd/ctprofd.yaml"
EMBEDDED_DEFAULT = Path(__file__).with_name("default.yaml")
EX_CONFIG = 78
LOG_LEVELS = ("debug", "info", "warn", "error", "warning")  # warn as the toolkit spells it
MAX_INTERVAL = 86400.0  # one day: a longer one is a typo, and a scheduler's float overflows


class ConfigError(Exception):
    """A configuration problem, rendered as one line: `SOURCE: KEY: PROBLEM`."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Matchers:
    """One include or exclude block; a process matches when any single entry matches."""

    comm: tuple[re.Pattern[str], ...] = ()
    exe: tuple[str, ...] = ()
    unit: tuple[str, ...] = ()
    uid: tuple[int, ...] = ()

    def empty(self) -> bool:
        return not (self.comm or self.exe or self.unit or self.uid)

    def matches(self, info: ProcessInfo) -> bool:
        # cheapest first; uid and unit cost a /proc read each, so only when a rule needs them
        return (any(p.search(info.comm) for p in self.comm)
                or (bool(self.uid) and info.uid in self.uid)
                or any(fnmatch.fnmatchcase(info.unit, g) for g in self.unit)
                or self._exe_matches(info))

    def _exe_matches(self, info: ProcessInfo) -> bool:
        """An unreadable executable link (exit race, policy) matches no glob."""
        if not self.exe:
            return False
        try:
            exe = info.exe
        except OSError:
            return False
        return any(fnmatch.fnmatchcase(exe, g) for g in self.exe)


@dataclass(frozen=True)
class Selection:
    include: Matchers = Matchers()
    exclude: Matchers = Matchers()

    def selects(self, info: ProcessInfo) -> bool:
        """Walked: included (or no include rule at all) and not excluded."""
        included = self.include.empty() or self.include.matches(info)
        return included and not self.exclude.matches(info)


@dataclass(frozen=True)
class ParserLimits:
    """Limits of the sandboxed process that parses target binaries."""

    memory_limit_mib: int = 512
    timeout: float = 30.0
    max_file_mib: int = 4096


@dataclass(frozen=True)
class Config:
    """The validated daemon configuration; defaults equal config/ctprofd.yaml."""

    listen: tuple[str, ...] = (":19455",)
    interval: float = 15.0
    cache_dir: str | None = "/var/cache/ctprofd"
    cache_max_entries: int = 4096
    cache_max_mib: int = 16
    state_dir: str = "/var/lib/ctprofd"
    debug_dirs: tuple[str, ...] = ("/usr/lib/debug",)
    debuginfod_urls: tuple[str, ...] = ()
    offsets_files: tuple[str, ...] = ()
    parser: ParserLimits = ParserLimits()
    selection: Selection = Selection()
    labels: tuple[str, ...] = ("comm", "unit")
    max_series: int = 10000
    series_retention: float = 300.0
    web_config_file: str | None = None
    log_level: str = "info"
    source: str = field(default="<defaults>", compare=False)


def load(path: str) -> Config:
    """Read and validate the YAML file at `path`; ConfigError on any problem."""
    return parse(read_text(path), path)


def read_text(path: str) -> str:
    """A configuration file's text: a regular file of at most MAX_CONFIG_BYTES in UTF-8,
    else a one-line ConfigError (nothing is read from a FIFO, a device or a huge file)."""
    try:
        return read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path, "", f"cannot read: {getattr(err, 'strerror', None) or err}")


def load_default() -> Config:
    """The embedded default configuration (ctprofd/config/default.yaml)."""
    return load(str(EMBEDDED_DEFAULT))


def load_effective(path: str | None, overrides: Sequence[Override] = ()) -> Config:
    """What every command runs with: `path` (--config), else /etc/ctprofd/ctprofd.yaml when
    present, else the embedded default; then `overrides` over it."""
    path = path or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)
    return apply_overrides(load(path) if path else load_default(), overrides)


@dataclass(frozen=True)
class Override:
    """A value for one configuration key given outside the file (a command-line flag),
    validated as the key is; `source` (the flag) names it in errors."""

    key: str
    value: Any
    source: str


def apply_overrides(config: Config, overrides: Sequence[Override]) -> Config:
    """`config` with each override's value; ConfigError naming the override if invalid."""
    return dataclasses.replace(config, **{
        o.key: _Validator(o.source).field(o.key, o.value, "") for o in overrides})


def parse(text: str, source: str) -> Config:
    """Validate YAML text; `source` names it in errors."""
    raw = load_yaml(text, source)
    return _Validator(source).config(raw)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a list or mapping as a key: PyYAML's own check refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML into a mapping (empty document = {}); one-line ConfigError if malformed."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(source, "", f"invalid YAML{where}: {problem}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"expected a mapping at top level, got {_kind(raw)}")
    return raw


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


class Reader:
    """Typed accessors that raise one-line ConfigErrors naming the source and key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                path = f"{key}.{name}" if key else str(name)
                raise self.fail(path, f"unknown key (known: {', '.join(allowed)})")
        return value

    def string(self, value: Any, key: str, nullable: bool = False) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_kind(value)}")
        return value

    def number(self, value: Any, key: str, minimum: float, exclusive: bool = False,
               maximum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value}")
        if value < minimum or (exclusive and value == minimum):
            raise self.fail(key, f"must be {'>' if exclusive else '>='} {minimum:g}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be <= {maximum:g}, got {value:g}")
        return float(value)

    def interval(self, value: Any, key: str) -> float:
        """Seconds between snapshots: finite, > 0 and at most a day."""
        return self.number(value, key, 0, exclusive=True, maximum=MAX_INTERVAL)

    def integer(self, value: Any, key: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_kind(value)}")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def items(self, value: Any, key: str) -> list[tuple[str, Any]]:
        """(key path, item) pairs of a list."""
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_kind(value)}")
        return [(f"{key}[{i}]", item) for i, item in enumerate(value)]

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        return tuple(self.string(item, path) for path, item in self.items(value, key))


class _Validator(Reader):
    """Turns the raw YAML mapping (or one overriding value) into Config fields."""

    def config(self, raw: dict[str, Any]) -> Config:
        names = tuple(n for n in Config.__dataclass_fields__ if n != "source")
        raw = self.mapping(raw, "", names)
        return Config(**{name: self.field(name, value, name) for name, value in raw.items()},
                      source=self.source)

    def field(self, name: str, value: Any, key: str) -> Any:
        """The valid value of the top-level field `name`; errors name `key`."""
        check: Callable[[Any, str], Any] = {
            "listen": self._listen,
            "interval": self.interval,
            "cache_dir": lambda v, k: self.string(v, k, nullable=True),
            "cache_max_entries": lambda v, k: self.integer(v, k, 1),
            "cache_max_mib": lambda v, k: self.integer(v, k, 1),
            "state_dir": self.string,
            "debug_dirs": self.strings,
            "debuginfod_urls": self._urls,
            "offsets_files": self.strings,
            "parser": self._parser,
            "selection": self._selection,
            "labels": self._labels,
            "max_series": lambda v, k: self.integer(v, k, 1),
            "series_retention": lambda v, k: self.number(v, k, 0),
            "web_config_file": lambda v, k: self.string(v, k, nullable=True),
            "log_level": self._log_level,
        }[name]
        return check(value, key)

    def _listen(self, value: Any, key: str) -> tuple[str, ...]:
        """HOST:PORT, or a list of them (each a socket)."""
        if not isinstance(value, list):
            values = [(key, self.string(value, key))]
        else:
            values = [(path, self.string(item, path)) for path, item in self.items(value, key)]
            if not values:
                raise self.fail(key, "give at least one HOST:PORT")
        seen = set()
        for path, text in values:
            try:
                address = parse_listen(text)
            except ValueError as err:
                raise self.fail(path, str(err))
            if address in seen:  # the second bind would fail: Address already in use
                raise self.fail(path, f"duplicate listen address {text!r}")
            seen.add(address)
        return tuple(text for _, text in values)

    def _urls(self, value: Any, key: str) -> tuple[str, ...]:
        urls = self.strings(value, key)
        for i, url in enumerate(urls):
            if not re.match(r"https?://[^/\s]+", url):
                raise self.fail(f"{key}[{i}]", f"not an http(s) URL: {url!r}")
        return urls

    def _parser(self, value: Any, key: str) -> ParserLimits:
        raw = self.mapping(value, key, ("memory_limit_mib", "timeout", "max_file_mib"))
        d = ParserLimits()
        return ParserLimits(
            memory_limit_mib=self.integer(raw.get("memory_limit_mib", d.memory_limit_mib),
                                          f"{key}.memory_limit_mib", 64),
            timeout=self.number(raw.get("timeout", d.timeout), f"{key}.timeout", 0,
                                exclusive=True),
            max_file_mib=self.integer(raw.get("max_file_mib", d.max_file_mib),
                                      f"{key}.max_file_mib", 1))

    def _selection(self, value: Any, key: str) -> Selection:
        raw = self.mapping(value, key, ("include", "exclude"))
        return Selection(include=self._matchers(raw.get("include", {}), f"{key}.include"),
                         exclude=self._matchers(raw.get("exclude", {}), f"{key}.exclude"))

    def _matchers(self, value: Any, key: str) -> Matchers:
        raw = self.mapping(value, key, ("comm", "exe", "unit", "uid"))
        patterns = []
        for path, item in self.items(raw.get("comm", []), f"{key}.comm"):
            try:
                patterns.append(re.compile(self.string(item, path)))
            except re.error as err:
                raise self.fail(path, f"invalid regex {item!r}: {err.msg}")
        uids = tuple(self.integer(item, path, 0)
                     for path, item in self.items(raw.get("uid", []), f"{key}.uid"))
        return Matchers(comm=tuple(patterns), exe=self.strings(raw.get("exe", []), f"{key}.exe"),
                        unit=self.strings(raw.get("unit", []), f"{key}.unit"), uid=uids)

    def _labels(self, value: Any, key: str) -> tuple[str, ...]:
        labels = self.strings(value, key)
        for i, name in enumerate(labels):
            if name not in LABEL_NAMES:
                raise self.fail(f"{key}[{i}]", f"unknown label {name!r} "
                                f"(choose from {', '.join(LABEL_NAMES)})")
            if name in labels[:i]:
                raise self.fail(f"{key}[{i}]", f"duplicate label {name!r}")
        return labels

    def _log_level(self, value: Any, key: str) -> str:
        level = self.string(value, key)
        if level not in LOG_LEVELS:
            raise self.fail(key, f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        return level
