#!/usr/bin/env python3
"""Write ctprofd(8) or its bash completion from the argparse parser itself, so that neither
can drift from the command line (scripts/build-deb.sh runs it at build time):

    scripts/cli_docs.py man DATE      roff man page on stdout (DATE as YYYY-MM-DD)
    scripts/cli_docs.py bash          bash completion script on stdout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctprofd import __version__  # noqa: E402
from ctprofd.cli import build_parser  # noqa: E402
from ctprofd.config.settings import DEFAULT_PATH  # noqa: E402

FILE_METAVARS = {"PATH", "FILE"}
NAME = "export the jemalloc allocation counters of every process to Prometheus"
DESCRIPTION = ("ctprofd reads the exact, cumulative allocation counters of every jemalloc-linked "
               "process on the host (per thread, through ptrace once and process_vm_readv "
               "after), without the process's cooperation, and serves them as Prometheus "
               "metrics. \\fBctprofd run\\fR is the daemon (the ctprofd service runs it); the "
               "other commands look at the host once.")


def commands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each subcommand's name, one-line help and parser, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's documented arguments (not --help, not the suppressed ones)."""
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no leading control dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def synopsis_of(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    if not action.option_strings:
        return f"\\fI{roff(formatter._metavar_formatter(action, action.dest)(1)[0])}\\fR"
    names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} \\fI{roff(formatter._format_args(action, action.dest.upper()))}\\fR"


def options_section(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    lines = []
    for action in shown(parser):
        lines += [".TP", synopsis_of(action, formatter),
                  roff(formatter._expand_help(action) if action.help else "")]
    return lines


def man_page(date: str) -> str:
    parser = build_parser()
    lines = [f'.TH CTPROFD 8 "{date}" "ctprofd {__version__}" "System Administration"',
             ".SH NAME", f"ctprofd \\- {roff(NAME)}",
             ".SH SYNOPSIS", "\\fBctprofd\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR "
             "[\\fICOMMAND OPTIONS\\fR]",
             ".SH DESCRIPTION", DESCRIPTION.replace("-", "\\-"),
             ".SH OPTIONS", *options_section(parser), ".SH COMMANDS"]
    for name, (help_text, sub) in commands(parser).items():
        usages = sub.format_usage().removeprefix("usage: ").strip().split("\n")
        usage = "\n.br\n".join(roff(" ".join(u.split())) for u in usages)
        lines += [f'.SS "{roff(name)}"', ".PP", usage, ".PP",
                  roff(" ".join((sub.description or help_text).split())),
                  *options_section(sub)]
    lines += [".SH FILES", ".TP", f"\\fI{roff(DEFAULT_PATH)}\\fR",
              "the configuration (\\fBctprofd check\\-config\\fR validates it)",
              ".TP", "\\fI/var/cache/ctprofd\\fR", "the layout cache",
              ".TP", "\\fI/var/lib/ctprofd\\fR", "the state kept across restarts",
              ".TP", "\\fI/usr/share/ctprofd\\fR",
              "Prometheus rules and alerts, the Grafana dashboard and provisioning",
              ".SH EXIT STATUS",
              "0 on success; 1 when a process asked for was not read or the listen address "
              "cannot be bound; 2 on a bad command line; 78 on a bad configuration.",
              ".SH SEE ALSO", "\\fBsystemctl\\fR(1), "
              "\\fI/usr/share/doc/ctprofd/daemon.md\\fR, "
              "\\fI/usr/share/doc/ctprofd/alerting.md\\fR"]
    return "\n".join(lines) + "\n"


def word_list(actions: list[argparse.Action]) -> str:
    return " ".join(o for a in actions for o in a.option_strings)


def value_cases(parser: argparse.ArgumentParser) -> list[str]:
    """`case $prev` arms for the options that take a value, over every parser."""
    arms: dict[str, str] = {}
    for p in [parser, *(sub for _, sub in commands(parser).values())]:
        for action in shown(p):
            if not action.option_strings or action.nargs == 0:
                continue
            if action.choices:
                reply = f'COMPREPLY=($(compgen -W "{" ".join(action.choices)}" -- "$cur"))'
            elif action.metavar == "DIR":
                reply = "_filedir -d"
            elif action.metavar in FILE_METAVARS:
                reply = "_filedir"
            elif action.dest == "pid":
                reply = "_pids"
            else:
                reply = ""
            arms["|".join(action.option_strings)] = reply
    return [f"        {names}) {reply}; return ;;" if reply else f"        {names}) return ;;"
            for names, reply in arms.items()]


def bash_completion() -> str:
    parser = build_parser()
    subs = commands(parser)
    lines = ["# bash completion for ctprofd, generated from its parser by scripts/cli_docs.py",
             "_ctprofd() {", "    local cur prev words cword", "    _init_completion || return",
             '    case "$prev" in', *value_cases(parser), "    esac",
             "    local i command=", "    for ((i = 1; i < cword; i++)); do",
             f'        case "${{words[i]}}" in {"|".join(subs)}) command=${{words[i]}}; '
             "break ;; esac", "    done", '    case "$command" in',
             f'        "") COMPREPLY=($(compgen -W "{" ".join(subs)} '
             f'{word_list(shown(parser))} --help" -- "$cur")) ;;']
    for name, (_, sub) in subs.items():
        takes_files = any(not a.option_strings for a in shown(sub))
        files = ' [[ $cur == -* ]] || { _filedir; return; };' if takes_files else ""
        lines.append(f"        {name}){files} COMPREPLY=($(compgen -W "
                     f'"{word_list(shown(sub))} --help" -- "$cur")) ;;')
    lines += ["    esac", "}", "complete -F _ctprofd ctprofd"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["man"] and len(argv) == 2:
        sys.stdout.write(man_page(argv[1]))
    elif argv == ["bash"]:
        sys.stdout.write(bash_completion())
    else:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
