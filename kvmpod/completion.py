"""Shell completion for bash and zsh, generated from kvmpod's argument parser (`kvmpod completion SHELL`).

The parser is walked once: every command path (`kvmpod`, `kvmpod run`, `kvmpod image build`...) gets its
subcommands, its options, which options take a value and what that value is (choices, a file, a
directory, free text), and what its positional arguments are (pod UUIDs, image names, files). The
script holds those tables and one shell function, shared by both shells, that walks the words typed
so far. Pod UUIDs and image names come from the machine when TAB is pressed: the script runs
`kvmpod __complete pods|images` (honouring a `--dir STORE` typed earlier). A command or flag added
to the parser is in the next generated script without any edit here.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from dataclasses import dataclass, field

from kvmpod import paths
from kvmpod.cli.run_words import app_parser
from kvmpod.errors import KvmpodError

# What an argument's value is, by its argparse dest: the rest is free text (nothing to complete).
VALUE_KINDS = {
    "uuid": "@pods", "uuids": "@pods",
    "images": "@images",
    "sources": "@files", "output": "@files", "pod_manifest": "@files", "kernel": "@files",
    "uuid_file_save": "@files",
    "rootfs": "@dirs", "dir": "@dirs",
}
RUN_IMAGE = "@images @files"   # `kvmpod run IMAGE`: a store name, or an ACI / archive file
HIDDEN_PREFIX = "__"           # hidden commands (`__complete`) are not offered


@dataclass
class CommandNode:
    path: str                                   # "kvmpod run"
    commands: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)   # option -> "-" | choices | @kind
    positionals: list[str] = field(default_factory=list)   # per position: a word list or @kinds
    repeat_last: bool = False


def _value_words(action: argparse.Action, path: str) -> str:
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return " ".join(str(c) for c in action.choices)
    if action.dest == "image":
        return RUN_IMAGE if path == "kvmpod run" else "@images"
    return VALUE_KINDS.get(action.dest, "-")


def _add_actions(node: CommandNode, parser: argparse.ArgumentParser, nodes: list[CommandNode]) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name.startswith(HIDDEN_PREFIX):
                    continue
                node.commands.append(name)
                child = CommandNode(f"{node.path} {name}")
                nodes.append(child)
                _add_actions(child, sub, nodes)
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            node.options.extend(action.option_strings)
            if action.nargs != 0:
                for option in action.option_strings:
                    node.values[option] = _value_words(action, node.path)
        elif action.help != argparse.SUPPRESS:
            node.positionals.append(_value_words(action, node.path))
            node.repeat_last = action.nargs in ("+", "*")


def command_tree(parser: argparse.ArgumentParser) -> list[CommandNode]:
    """Every command path of the parser, the top level first. `run` also gets the app flags, which
    follow its IMAGE (kvmpod/cli/run.py parses them itself)."""
    top = CommandNode("kvmpod")
    nodes = [top]
    _add_actions(top, parser, nodes)
    run = next((n for n in nodes if n.path == "kvmpod run"), None)
    if run is not None:
        app = CommandNode("kvmpod run")
        _add_actions(app, app_parser(), [])
        run.options.extend(o for o in app.options if o not in run.options)
        run.values.update({k: v for k, v in app.values.items() if k not in run.values})
    return nodes


def _assoc(name: str, table: dict[str, str]) -> str:
    """An associative array assignment both bash (>= 5.1) and zsh read: name=(key value ...)."""
    pairs = " ".join(f"{shlex.quote(k)} {shlex.quote(v)}" for k, v in sorted(table.items()))
    return f"typeset -gA {name}\n{name}=({pairs})\n"


def _tables(nodes: list[CommandNode]) -> str:
    commands = {n.path: " ".join(n.commands) for n in nodes if n.commands}
    options = {n.path: " ".join(n.options) for n in nodes}
    values = {f"{n.path} {option}": words for n in nodes for option, words in n.values.items()}
    positionals = {n.path: "|".join(n.positionals) + ("*" if n.repeat_last else "") for n in nodes if n.positionals}
    return (_assoc("_kvmpod_cmds", commands) + _assoc("_kvmpod_opts", options) + _assoc("_kvmpod_vals", values)
            + _assoc("_kvmpod_pos", positionals))


# The words typed so far -> the candidates for the current one, one per line; @files / @dirs ask the
# shell for its own file completion. Written once for bash and zsh (both run it as is; no variable may
# be called `path`, zsh's alias of PATH).
CORE = r'''
_kvmpod_core() {  # _kvmpod_core CUR WORD... (the words between the command and the cursor)
  [[ -n ${ZSH_VERSION-} ]] && setopt localoptions shwordsplit noglob
  local cur=$1 at=kvmpod prev="" w skip=0 npos=0 store="" list="" kinds n word
  shift
  for w in "$@"; do
    if (( skip )); then
      skip=0; [[ $prev == --dir ]] && store=$w; prev=$w; continue
    fi
    [[ $w == -- ]] && return 0                      # the app's own arguments
    if [[ $w == --- ]]; then npos=0; prev=$w; continue; fi   # run: the next app's IMAGE
    if [[ $w == -* ]]; then
      [[ $w != *=* && -n ${_kvmpod_vals[$at $w]-} ]] && skip=1
      prev=$w; continue
    fi
    if (( npos == 0 )) && [[ " ${_kvmpod_cmds[$at]-} " == *" $w "* ]]; then
      at="$at $w"; prev=$w; continue
    fi
    npos=$((npos + 1)); prev=$w
  done
  if (( skip )); then
    list=${_kvmpod_vals[$at $prev]}
  elif [[ $cur == -* ]]; then
    list=${_kvmpod_opts[$at]-}
  elif (( npos == 0 )) && [[ -n ${_kvmpod_cmds[$at]-} ]]; then
    list=${_kvmpod_cmds[$at]}
  else
    kinds=${_kvmpod_pos[$at]-}
    n=0
    while :; do
      word=${kinds%%|*}
      if (( n == npos )) || [[ $word == "$kinds" ]]; then
        [[ $word == *'*' ]] && word=${word%'*'}
        if (( n == npos )) || [[ ${kinds} == *'*' ]]; then list=$word; fi
        break
      fi
      kinds=${kinds#*|}; n=$((n + 1))
    done
  fi
  for word in $list; do
    case $word in
      -) ;;
      @pods|@images)
        local -a dirflag=()
        [[ -n $store ]] && dirflag=(--dir "$store")
        command "${_kvmpod_cmd:-kvmpod}" "${dirflag[@]}" __complete "${word#@}" 2>/dev/null |
          while IFS= read -r w; do [[ $w == "$cur"* ]] && printf '%s\n' "$w"; done ;;
      @files|@dirs) printf '%s\n' "$word" ;;
      *) [[ $word == "$cur"* ]] && printf '%s\n' "$word" ;;
    esac
  done
  return 0
}
'''

BASH = r'''
_kvmpod() {
  local cur=${COMP_WORDS[COMP_CWORD]} line files=0
  COMPREPLY=()
  while IFS= read -r line; do
    case $line in
      @files) files=1; COMPREPLY+=($(compgen -f -- "$cur")) ;;
      @dirs) files=1; COMPREPLY+=($(compgen -d -- "$cur")) ;;
      *) COMPREPLY+=("$line") ;;
    esac
  done < <(_kvmpod_cmd=${COMP_WORDS[0]} _kvmpod_core "$cur" "${COMP_WORDS[@]:1:COMP_CWORD-1}")
  (( files )) && compopt -o filenames 2>/dev/null
  return 0
}
complete -F _kvmpod kvmpod
'''

ZSH = r'''
_kvmpod() {
  local line files=0 dirs=0
  local -a candidates
  for line in "${(@f)$(_kvmpod_cmd=${words[1]} _kvmpod_core "${words[CURRENT]}" "${(@)words[2,CURRENT-1]}")}"; do
    case $line in
      @files) files=1 ;;
      @dirs) dirs=1 ;;
      ?*) candidates+=("$line") ;;
    esac
  done
  (( ${#candidates} )) && compadd -- "${candidates[@]}"
  (( files )) && _files
  (( dirs )) && _files -/
  return 0
}
if [[ ${zsh_eval_context[-1]-} == loadautofunc ]]; then
  _kvmpod "$@"
else
  compdef _kvmpod kvmpod
fi
'''


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    head = {"bash": "# bash completion for kvmpod", "zsh": "#compdef kvmpod"}[shell]
    body = BASH if shell == "bash" else ZSH
    return (f"{head}\n# Generated from kvmpod's argument parser by `kvmpod completion {shell}`: do not edit.\n"
            f"{_tables(command_tree(parser))}{CORE}{body}")


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def dynamic_words(kind: str) -> list[str]:
    """`kvmpod __complete pods|images`: the pod UUIDs in this user's runtime dir, the image names (and
    NAME:VERSION) in the store. Unreadable places give nothing: completion never fails loudly."""
    if kind == "pods":
        try:
            return sorted(e for e in os.listdir(paths.pods_dir()) if _UUID.match(e))
        except OSError:
            return []
    from kvmpod.store import Store  # the store (~50 ms of imports) only for image names, not on every <TAB>

    try:
        records = Store().list_records()
    except (KvmpodError, OSError):
        return []
    words = {r.name for r in records}
    words |= {f"{r.name}:{r.labels['version']}" for r in records if r.labels.get("version")}
    return sorted(words)
