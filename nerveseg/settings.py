"""Command-line settings generated from a script's own block of constants.

Each script opens with a block of UPPER_CASE constants, one per line, each with a trailing comment,
between two ruler comments (``# ---``). A comment line of its own inside the block starts a group.
A constant may carry what it accepts as its annotation: `Bounds` for a number (each number, for a list)
and `OneOf` for a word; its type is its default's.

    SEED: Bounds(at_least=0, below=2**31) = 0  # seeds the split   ->   --seed 7
    MODEL: OneOf(MODELS) = "unet"  # the network                    ->   --model segresnet

`parse_settings` builds an argparse parser from the block (the help text is the comment, with the default
and what is accepted) and returns the resolved values, each checked against its declaration:

    code defaults  <-  optional --config settings.json  <-  command-line options

`options_markdown` writes docs/options.md from the same declarations (`python -m nerveseg.settings`).
"""

import argparse
import ast
import difflib
import io
import json
import math
import os
import re
import stat
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nerveseg.errors import UserError

TRUE_WORDS = {"true", "yes", "1", "on"}
FALSE_WORDS = {"false", "no", "0", "off"}
AUTO_TRUE_FALSE = ("auto", "true", "false")  # a choice the script can also make itself (auto)
SCRIPTS = ("data_cleaning.py", "train.py", "predict.py", "export.py")  # the scripts docs/options.md documents


# What a setting accepts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """The limits of a number setting (of each of its numbers, for a list): at_least and at_most include the
    limit, above and below exclude it."""

    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None
    below: float | None = None

    def describe(self) -> str:
        low = (f"at least {self.at_least}" if self.at_least is not None
               else f"above {self.above}" if self.above is not None else "")
        high = (f"at most {self.at_most}" if self.at_most is not None
                else f"below {self.below}" if self.below is not None else "")
        return " and ".join(filter(None, [low, high]))

    def check(self, value: float, flag: str) -> None:
        inside = ((self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)
                  and (self.above is None or value > self.above) and (self.below is None or value < self.below))
        if not inside:
            raise UserError(f"{flag} must be {self.describe()}, not {value}")


@dataclass(frozen=True)
class OneOf:
    """The words a text setting accepts (with or_file, also the path of an existing file)."""

    choices: tuple[str, ...]
    or_file: bool = False

    def describe(self) -> str:
        words = ", ".join(repr(word) if word == "" else word for word in self.choices)
        return f"one of {words}" + (" or a file" if self.or_file else "")

    def check(self, value: str, flag: str) -> None:
        if value in self.choices or (self.or_file and Path(value).is_file()):
            return
        close = difflib.get_close_matches(value, [word for word in self.choices if word], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{flag} takes {self.describe()}, not {value!r}{hint}")


Declaration = Bounds | OneOf


@dataclass
class Setting:
    """One constant of a settings block."""

    name: str
    comment: str
    group: str


def block_assignments(source: str) -> dict[int, tuple[str, ast.expr]]:
    """The module-level assignments of a source to a plain name, by line: {line: (NAME, value)}."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.lineno] = (node.targets[0].id, node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            found[node.lineno] = (node.target.id, node.value)
    return found


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
    assigned = block_assignments(source)
    for number in range(first + 1, last):
        stripped = lines[number - 1].strip()
        if number in assigned and assigned[number][0].isupper():
            settings.append(Setting(assigned[number][0], comments.get(number, ""), group))
        elif stripped.startswith("#"):
            group = stripped.lstrip("#").strip()
    return settings


def script_defaults(script: str | Path) -> dict[str, Any]:
    """The settings block of a script as {NAME: default}: its source is read, never run."""
    source = Path(script).read_text()
    names = {setting.name for setting in read_settings_block(source)}
    return {name: ast.literal_eval(value) for name, value in block_assignments(source).values() if name in names}


def script_namespace(script: str | Path) -> dict[str, Any]:
    """A script's globals as its settings block leaves them: its imports and its block are run (the lines up to
    the block's closing ruler; a script does its work only after it), so the declarations can be read."""
    source = Path(script).read_text()
    lines = source.splitlines(keepends=True)
    closing = [i for i, line in enumerate(lines) if line.startswith("# ---")][1]
    namespace = {"__file__": str(script), "__name__": "nerveseg.settings.reading"}
    exec(compile("".join(lines[:closing]), str(script), "exec"), namespace)
    return namespace


def declarations(namespace: dict[str, Any]) -> dict[str, Declaration]:
    """The settings' annotations in a script's globals (evaluated when Python made them lazy)."""
    annotations = namespace.get("__annotations__")
    if annotations is None and callable(namespace.get("__annotate__")):
        annotations = namespace["__annotate__"](1)
    return {name: value for name, value in (annotations or {}).items() if isinstance(value, Bounds | OneOf)}


# Reading a value -------------------------------------------------------------------------------------------------
def option_name(name: str) -> str:
    """BATCH_SIZE -> --batch-size."""
    return "--" + name.lower().replace("_", "-")


def kind_of(default: Any) -> str:
    """What a setting takes, in words, from its default."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, tuple):
        return "a list of values separated by commas"
    return {int: "a whole number", float: "a number"}.get(type(default), "a text")


def convert(value: Any, default: Any, name: str) -> Any:
    """Convert a command-line text or a JSON value to the type of the setting's default. A JSON value is read as
    its text would be, except that null, objects, lists (but for a list setting) and, for a number, true and
    false are refused."""
    flag = option_name(name)
    refused = (value is None or isinstance(value, dict) or (isinstance(value, list) and not isinstance(default, tuple))
               or (isinstance(value, bool) and isinstance(default, int | float) and not isinstance(default, bool)))
    if refused:
        raise UserError(f"{flag} takes {kind_of(default)}, not {json.dumps(value)}")
    if isinstance(default, bool):
        word = str(value).strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise UserError(f"{flag} takes true or false, not {value!r}")
    if isinstance(default, tuple):
        parts = value if isinstance(value, list | tuple) else [p for p in str(value).split(",") if p.strip()]
        element = default[0] if default else ""
        return tuple(convert(part, element, name) for part in parts)
    if isinstance(value, bool):  # a JSON true or false for a text setting: as written on the command line
        return "true" if value else "false"
    try:
        if isinstance(default, int):
            return int(value) if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(default, int) and number.is_integer():
        return int(number)  # 1e3, 32.0
    if isinstance(default, float) and math.isfinite(number):
        return number
    if isinstance(default, int | float):
        raise UserError(f"{flag} takes {kind_of(default)}, not {value!r}")
    return str(value)


def check(value: Any, declaration: Declaration | None, name: str) -> None:
    """Refuse a value its declaration does not accept (each element of a list)."""
    if declaration is not None:
        for element in value if isinstance(value, tuple) else (value,):
            declaration.check(element, option_name(name))


def format_default(value: Any) -> str:
    """How a default is shown in -h and accepted back on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# The parser ------------------------------------------------------------------------------------------------------
class SettingsParser(argparse.ArgumentParser):
    """argparse's parser, whose messages also say how to give a value that starts with '-'."""

    argv: list[str] = []

    def error(self, message: str):
        missing = re.match(r"argument (--[\w-]+): expected one argument", message)
        if missing and missing[1] in self.argv:
            given = self.argv[self.argv.index(missing[1]) + 1:][:1]
            if given and given[0].startswith("-"):
                message += f"; for a value that starts with '-', write {missing[1]}={given[0]}"
        super().error(message)


def accepted(default: Any, declaration: Declaration | None) -> str:
    """What a setting accepts, in words: its declaration's (of each value, for a list), or its type's."""
    if declaration is None:
        return kind_of(default)
    return ("each " if isinstance(default, tuple) else "") + declaration.describe()


def help_text(setting: Setting, default: Any, declaration: Declaration | None) -> str:
    """A setting's line in -h: its comment, its default and what it accepts."""
    shown_as_metavar = isinstance(declaration, OneOf) and not declaration.or_file
    accepts = f"; {accepted(default, declaration)}" if declaration is not None and not shown_as_metavar else ""
    return f"{setting.comment} (default: {format_default(default)}{accepts})"


def build_parser(settings: list[Setting], defaults: dict[str, Any], description: str,
                 declared: dict[str, Declaration] | None = None) -> SettingsParser:
    """An argparse parser with one option per setting, grouped as in the block."""
    declared = declared or {}
    parser = SettingsParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--config", metavar="JSON", help='a JSON file of settings ({"batch_size": 32, ...}); options given here win'
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in settings:
        group = groups.setdefault(setting.group, parser.add_argument_group(setting.group))
        default, declaration = defaults[setting.name], declared.get(setting.name)
        text = help_text(setting, default, declaration).replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(option_name(setting.name), dest=setting.name, nargs="?", const="true",
                               metavar="true|false", help=text)
            continue
        if isinstance(declaration, OneOf) and not declaration.or_file:
            metavar = "{" + ",".join(declaration.choices) + "}"
        else:
            metavar = "A,B,..." if isinstance(default, tuple) else type(default).__name__.upper()
        group.add_argument(option_name(setting.name), dest=setting.name, metavar=metavar, help=text)
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
    except RecursionError:
        raise UserError(f"{path} nests too deep to be settings; write it as a flat JSON object such as "
                        f"{example}") from None
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
    """Resolve a script's settings: its constants, then --config, then the command line; each value is checked
    against its declaration.

    `namespace` is the script's globals(); the defaults are its current values, so edits made in an
    interactive session count. When the script is not run from the command line (a notebook or an
    interactive window), the command line is ignored.
    """
    script = namespace.get("__file__")
    if script is None:
        raise ValueError("parse_settings needs the script's globals(), with __file__")
    settings = read_settings_block(Path(script).read_text())
    defaults = {s.name: namespace[s.name] for s in settings}
    declared = declarations(namespace)
    if argv is None:
        interactive = namespace.get("__name__") != "__main__" or "ipykernel" in sys.modules
        argv = [] if interactive else sys.argv[1:]
    parser = build_parser(settings, defaults, description or (namespace.get("__doc__") or ""), declared)
    parser.argv = argv
    arguments = parser.parse_args(argv)  # argparse itself explains a bad option and exits with status 2
    resolved = dict(defaults)
    if arguments.config:
        resolved.update(read_config_file(arguments.config, defaults))
    for name, default in defaults.items():
        text = getattr(arguments, name)
        if text is not None:
            resolved[name] = convert(text, default, name)
    for name, value in resolved.items():
        check(value, declared.get(name), name)
    return resolved


def settings_to_json(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as plain JSON values, keyed by lower-case names (the form --config reads back)."""
    return {name.lower(): list(value) if isinstance(value, tuple) else value for name, value in settings.items()}


# docs/options.md -------------------------------------------------------------------------------------------------
OPTIONS_INTRO = """# All options

Every setting is a constant in the settings block at the top of its script (edit it there) and a
command-line option; `-h` prints this list, `--config FILE.json` reads settings from a file. This page is
generated from the settings blocks (`python -m nerveseg.settings`); a test fails when it is stale.
"""


def options_table(script: Path) -> str:
    """One script's section of docs/options.md: each option, its default, what it accepts and what it does."""
    namespace = script_namespace(script)
    declared = declarations(namespace)
    rows = [f"## `{script.name}`", "", "| option | default | accepts | what it does |", "|---|---|---|---|"]
    for setting in read_settings_block(script.read_text()):
        default = namespace[setting.name]
        declaration = declared.get(setting.name)
        accepts = accepted(default, declaration)
        shown = f"`{format_default(default)}`" if default != "" else '`""`'
        rows.append(f"| `{option_name(setting.name)}` | {shown} | {accepts} | "
                    f"{setting.comment.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def options_markdown(root: Path) -> str:
    """docs/options.md: the options of every script, from their settings blocks."""
    return "\n".join([OPTIONS_INTRO, *(options_table(root / script) for script in SCRIPTS)])


if __name__ == "__main__":  # python -m nerveseg.settings: docs/options.md anew
    from nerveseg.files import atomic_write
    from nerveseg.settings import options_markdown as markdown  # the scripts' Bounds and OneOf, not __main__'s

    root = Path(__file__).resolve().parents[1]
    with atomic_write(root / "docs" / "options.md") as file:
        file.write(markdown(root))
    print(f"wrote {root / 'docs' / 'options.md'}")
