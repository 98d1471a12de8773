"""The settings block -> command line mechanism shared by the three scripts."""

import json
from pathlib import Path

import pytest

from nerveseg.errors import UserError
from nerveseg.settings import convert, parse_settings, read_settings_block

SCRIPT = '''"""A script."""
# ---
# Group one
COUNT = 3  # how many
RATE = 0.5  # how fast
NAME = "x"  # what
# Group two
FLAG = False  # whether
SIZES = (1, 2)  # which
# ---
AFTER = 1  # not a setting
'''


@pytest.fixture()
def namespace(tmp_path: Path) -> dict:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return {
        "__file__": str(script),
        "__name__": "__main__",
        "COUNT": 3,
        "RATE": 0.5,
        "NAME": "x",
        "FLAG": False,
        "SIZES": (1, 2),
        "AFTER": 1,
    }


def test_the_block_is_read_with_comments_and_groups():
    settings = read_settings_block(SCRIPT)
    assert [s.name for s in settings] == ["COUNT", "RATE", "NAME", "FLAG", "SIZES"]
    assert settings[0].comment == "how many" and settings[0].group == "Group one"
    assert settings[3].group == "Group two"


def test_types_come_from_the_defaults(namespace):
    resolved = parse_settings(
        namespace, argv=["--count", "7", "--rate", "1", "--name", "y", "--flag", "--sizes", "4,5,6"]
    )
    assert resolved == {"COUNT": 7, "RATE": 1.0, "NAME": "y", "FLAG": True, "SIZES": (4, 5, 6)}
    assert isinstance(resolved["RATE"], float)
    assert parse_settings(namespace, argv=["--flag", "false"])["FLAG"] is False
    assert parse_settings(namespace, argv=[]) == {k: namespace[k] for k in ("COUNT", "RATE", "NAME", "FLAG", "SIZES")}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "2.5"], "--count takes a whole number"),
        (["--count", "many"], "--count takes a whole number"),
        (["--rate", "fast"], "--rate takes a number"),
        (["--flag", "maybe"], "--flag takes true or false"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(namespace, argv, message):
    with pytest.raises(UserError, match=message):
        parse_settings(namespace, argv=argv)


def test_unknown_options_are_refused(namespace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(namespace, argv=["--after", "2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --after" in capsys.readouterr().err


def test_help_shows_comments_and_defaults(namespace, capsys):
    with pytest.raises(SystemExit):
        parse_settings(namespace, argv=["-h"])
    text = capsys.readouterr().out
    assert "how many (default: 3)" in text and "Group two" in text and "(default: 1,2)" in text


def test_a_json_config_sits_between_the_code_and_the_command_line(namespace, tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"count": 9, "RATE": 2, "sizes": [7]}))
    resolved = parse_settings(namespace, argv=["--config", str(config), "--count", "4"])
    assert resolved["COUNT"] == 4 and resolved["RATE"] == 2.0 and resolved["SIZES"] == (7,)
    config.write_text(json.dumps({"colour": 1}))
    with pytest.raises(UserError, match="unknown setting 'colour'"):
        parse_settings(namespace, argv=["--config", str(config)])


def test_interactive_use_ignores_the_command_line(namespace, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ipykernel_launcher.py", "--f=/tmp/kernel.json"])
    namespace["__name__"] = "notebook"
    assert parse_settings(namespace)["COUNT"] == 3


def test_convert_accepts_an_int_where_a_float_is_expected():
    assert convert("1", 0.001, "LEARNING_RATE") == 1.0
    assert convert("1e-3", 0.001, "LEARNING_RATE") == 0.001


def test_a_settings_file_that_is_not_utf8_or_not_a_file_is_named_with_the_fix(namespace, tmp_path):
    config = tmp_path / "settings.json"
    config.write_bytes('{"name": "Café"}'.encode("latin-1"))
    with pytest.raises(UserError, match=r"settings.json is not UTF-8 text \(byte 0xe9 at position 13\); save it as"):
        parse_settings(namespace, argv=["--config", str(config)])
    config.write_bytes('\ufeff{"name": "Café"}'.encode())  # UTF-8 with a byte-order mark, as Notepad saves it
    assert parse_settings(namespace, argv=["--config", str(config)])["NAME"] == "Café"
    for not_a_file in ("/dev/null", str(tmp_path)):
        with pytest.raises(UserError, match=f"--config {not_a_file} is not a file; pass a JSON file of settings"):
            parse_settings(namespace, argv=["--config", not_a_file])
