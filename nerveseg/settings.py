"""Command-line settings generated from a script's own block of constants.

Each script opens with a block of UPPER_CASE constants, one per line, each with a trailing comment,
between two ruler comments (``# ---``). A comment line of its own inside the block starts a group.
`parse_settings` reads that block from the script's source (it never executes a file), builds an
argparse parser from it (the type comes from the default, the help text from the comment) and
returns the resolved values:

    code defaults  <-  optional --config settings.json  <-  command-line options

    BATCH_SIZE = 128  # images per step   ->   --batch-size 32
"""

import argparse
import ast
import io
import json
import os
import stat
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nerveseg.errors import UserError

TRUE_WORDS = {"true", "yes", "1", "on"}
FALSE_WORDS = {"false", "no", "0", "off"}


@dataclass
class Setting:
    """One constant of a settings block."""

    name: str
    comment: str
    group: str


def read_settings_block(source: str) -> list[Setting]:
    """Return the constants of the block between the first two ``# ---`` rulers of a script's source."""
    lines = source.splitlines()
    rulers = [i for i, line in enumerate(lines) if line.startswith("# ---")]
    if len(rulers) < 2:
        raise ValueError("the script has no settings block between two '# ---' rulers")
    first, last = rulers[0] + 1, rulers[1] + 1  # 1-based line numbers of the block
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    settings, group = [], "settings"
    assigned = {
        node.lineno: node.targets[0].id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    for number in range(first + 1, last):
        stripped = lines[number - 1].strip()
        if number in assigned and assigned[number].isupper():
            settings.append(Setting(assigned[number], comments.get(number, ""), group))
        elif stripped.startswith("#"):
            group = stripped.lstrip("#").strip()
    return settings


def script_defaults(script: str | Path) -> dict[str, Any]:
    """The settings block of a script as {NAME: default}: its source is read, never run."""
    source = Path(script).read_text()
    names = {setting.name for setting in read_settings_block(source)}
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in names
    }


def option_name(name: str) -> str:
    """BATCH_SIZE -> --batch-size."""
    return "--" + name.lower().replace("_", "-")


def convert(text: Any, default: Any, name: str) -> Any:
    """Convert a command-line or JSON value to the type of the setting's default."""
    flag = option_name(name)
    if isinstance(default, bool):
        if isinstance(text, bool):
            return text
        word = str(text).strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise UserError(f"{flag} takes true or false, not {text!r}")
    if isinstance(default, tuple):
        parts = text if isinstance(text, list | tuple) else [p for p in str(text).split(",") if p.strip()]
        element = default[0] if default else ""
        return tuple(convert(part, element, name) for part in parts)
    try:
        if isinstance(default, int):
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(text)
    except (TypeError, ValueError):
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise UserError(f"{flag} takes {kind}, not {text!r}") from None
    return str(text)


def format_default(value: Any) -> str:
    """How a default is shown in -h and accepted back on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def build_parser(settings: list[Setting], defaults: dict[str, Any], description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per setting, grouped as in the block."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--config", metavar="JSON", help='a JSON file of settings ({"batch_size": 32, ...}); options given here win'
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in settings:
        group = groups.setdefault(setting.group, parser.add_argument_group(setting.group))
        default = defaults[setting.name]
        help_text = f"{setting.comment} (default: {format_default(default)})".replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(
                option_name(setting.name),
                dest=setting.name,
                nargs="?",
                const="true",
                metavar="true|false",
                help=help_text,
            )
        else:
            group.add_argument(
                option_name(setting.name),
                dest=setting.name,
                metavar=type(default).__name__.upper() if not isinstance(default, tuple) else "A,B,...",
                help=help_text,
            )
    return parser


def read_config_file(path: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Settings from a JSON file (UTF-8, a regular file: a named pipe is never opened); keys may be written
    batch_size or BATCH_SIZE. Unknown keys are refused."""
    example = '{"batch_size": 32}'
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UserError(f"--config {path} is not a file; pass a JSON file of settings such as {example}")
        values = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as error:
        raise UserError(f"cannot read the settings file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at position {error.start});"
                        f" save it as UTF-8, a JSON object such as {example}") from None
    except json.JSONDecodeError as error:
        raise UserError(f'{path} is not valid JSON ({error}); write it as {{"batch_size": 32}}') from None
    if not isinstance(values, dict):
        raise UserError(f'{path} must hold a JSON object such as {{"batch_size": 32}}')
    resolved = {}
    for key, value in values.items():
        name = key.upper()
        if name not in defaults:
            raise UserError(f"{path}: unknown setting {key!r}; run with -h to list the settings")
        resolved[name] = convert(value, defaults[name], name)
    return resolved


def parse_settings(namespace: dict[str, Any], description: str = "", argv: list[str] | None = None) -> dict[str, Any]:
    """Resolve a script's settings: its constants, then --config, then the command line.

    `namespace` is the script's globals(); the defaults are its current values, so edits made in an
    interactive session count. When the script is not run from the command line (a notebook or an
    interactive window), the command line is ignored.
    """
    script = namespace.get("__file__")
    if script is None:
        raise ValueError("parse_settings needs the script's globals(), with __file__")
    settings = read_settings_block(Path(script).read_text())
    defaults = {s.name: namespace[s.name] for s in settings}
    if argv is None:
        interactive = namespace.get("__name__") != "__main__" or "ipykernel" in sys.modules
        argv = [] if interactive else sys.argv[1:]
    parser = build_parser(settings, defaults, description or (namespace.get("__doc__") or ""))
    arguments = parser.parse_args(argv)  # argparse itself explains a bad option and exits with status 2
    resolved = dict(defaults)
    if arguments.config:
        resolved.update(read_config_file(arguments.config, defaults))
    for name, default in defaults.items():
        text = getattr(arguments, name)
        if text is not None:
            resolved[name] = convert(text, default, name)
    return resolved


def settings_to_json(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as plain JSON values, keyed by lower-case names (the form --config reads back)."""
    return {name.lower(): list(value) if isinstance(value, tuple) else value for name, value in settings.items()}
