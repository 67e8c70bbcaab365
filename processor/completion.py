"""Shell completion for `ftjobs`, generated from its own argparse parser (`ftjobs completion bash|zsh|fish`).

argparse has no completion of its own, and a completion package would be one more dependency and slower
start-up; the parser already knows every subcommand, option and choice, so the scripts are written from it
and cannot drift from the real command line. Nothing here imports more than argparse.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh", "fish")


@dataclass
class Command:
    """What one (sub)command accepts: its options, which of them take a value (and whether that is a file),
    and the choices of each positional argument in order (empty: any word)."""

    name: str
    help: str = ""
    options: list[tuple[str, str]] = field(default_factory=list)  # (option string, help)
    takes_value: set[str] = field(default_factory=set)
    takes_file: set[str] = field(default_factory=set)
    positionals: list[list[str]] = field(default_factory=list)


def describe(parser: argparse.ArgumentParser) -> tuple[Command, list[Command]]:
    """The top-level command and its subcommands, read from the parser's actions."""
    top, subcommands = _command("", "", parser), []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            subcommands = [_command(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return top, subcommands


def _command(name: str, help_: str, parser: argparse.ArgumentParser) -> Command:
    command = Command(name, help_)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if not action.option_strings:
            command.positionals.append([str(c) for c in action.choices] if action.choices else [])
            continue
        for option in action.option_strings:
            command.options.append((option, action.help or ""))
            if action.nargs != 0:
                command.takes_value.add(option)
                if action.metavar == "FILE":
                    command.takes_file.add(option)
    return command


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell` (one of `SHELLS`)."""
    top, subcommands = describe(parser)
    if shell == "fish":
        return _fish(top, subcommands)
    bash = _bash(top, subcommands)
    if shell == "zsh":  # zsh runs the bash function through its bash-completion emulation
        return f"#compdef ftjobs\nautoload -U +X bashcompinit && bashcompinit\n{bash}"
    return bash


def _words(items: list[str]) -> str:
    return shlex.quote(" ".join(items))


def _bash(top: Command, subcommands: list[Command]) -> str:
    specs = "".join(
        f"        {shlex.quote(c.name)}) opts={_words([o for o, _ in c.options])} "
        f"valued={_words(sorted(c.takes_value))} files={_words(sorted(c.takes_file))} ;;\n"
        for c in subcommands
    )
    positionals = "".join(
        f"        {shlex.quote(f'{c.name} {i}')}) words={_words(choices)} ;;\n"
        for c in subcommands
        for i, choices in enumerate(c.positionals)
        if choices
    )
    return f"""# ftjobs completion for bash: eval "$(ftjobs completion bash)"
# Generated from the ftjobs parser; regenerate after an upgrade.
_ftjobs_spec() {{  # the options of subcommand $1: all, those taking a value, those taking a file
    case "$1" in
{specs}        *) opts="" valued="" files="" ;;
    esac
}}
_ftjobs_positional() {{  # the choices for positional argument $2 (from 0) of subcommand $1
    case "$1 $2" in
{positionals}        *) words="" ;;
    esac
}}
_ftjobs() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local cmd="" npos=0 i word skip=0
    local opts={_words([o for o, _ in top.options])} valued={_words(sorted(top.takes_value))}
    local files={_words(sorted(top.takes_file))} words={_words([c.name for c in subcommands])}
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        if ((skip)); then skip=0; continue; fi
        case "$word" in
            --*=*) continue ;;
            -*) [[ " $valued " == *" $word "* ]] && skip=1; continue ;;
        esac
        if [[ -z "$cmd" ]]; then cmd="$word"; _ftjobs_spec "$cmd"; else npos=$((npos + 1)); fi
    done
    [[ -z "$cmd" ]] || _ftjobs_positional "$cmd" "$npos"
    if [[ " $valued " == *" $prev "* ]]; then
        if [[ " $files " == *" $prev "* ]]; then COMPREPLY=($(compgen -f -- "$cur")); else COMPREPLY=(); fi
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    fi
    return 0
}}
complete -F _ftjobs ftjobs
"""


def _fish(top: Command, subcommands: list[Command]) -> str:
    lines = ["# ftjobs completion for fish: ftjobs completion fish | source", "complete -c ftjobs -f"]

    def option_lines(command: Command, condition: str) -> None:
        for option, help_ in command.options:
            flag = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
            value = " -F" if option in command.takes_file else " -r" if option in command.takes_value else ""
            lines.append(f"complete -c ftjobs -n {shlex.quote(condition)} {flag}{value} -d {shlex.quote(help_)}")

    option_lines(top, "__fish_use_subcommand")
    for command in subcommands:
        lines.append(
            f"complete -c ftjobs -n __fish_use_subcommand -a {shlex.quote(command.name)} -d {shlex.quote(command.help)}"
        )
    for command in subcommands:
        seen = f"__fish_seen_subcommand_from {command.name}"
        option_lines(command, seen)
        if command.positionals and command.positionals[0]:  # the first positional's choices (dlq's actions)
            choices = " ".join(command.positionals[0])
            condition = f"{seen}; and not __fish_seen_subcommand_from {choices}"
            lines.append(f"complete -c ftjobs -n {shlex.quote(condition)} -a {shlex.quote(choices)}")
    return "\n".join(lines) + "\n"
