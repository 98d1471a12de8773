"""The settings block -> command line mechanism shared by the four scripts, and each setting's declaration."""

import json
import re
from pathlib import Path

import pytest

from nerveseg.errors import UserError
from nerveseg.settings import (
    SCRIPTS,
    Bounds,
    OneOf,
    convert,
    options_markdown,
    parse_settings,
    read_settings_block,
    script_defaults,
    script_namespace,
)
from tests.helpers import ROOT

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


# Each setting's declaration: checked by the parser, for every script ----------------------------------------------
@pytest.fixture(scope="module")
def scripts() -> dict[str, dict]:
    """Each script's globals as its settings block leaves them (defaults and declarations)."""
    return {script: script_namespace(ROOT / script) for script in SCRIPTS}


def test_every_script_accepts_its_own_defaults(scripts):
    for script, namespace in scripts.items():
        assert parse_settings(namespace, argv=[]) == script_defaults(ROOT / script), script


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("train.py", ["--strides", "0,2,2,2"], "--strides must be at least 1, not 0"),  # was a ZeroDivisionError
    ("train.py", ["--seed", "1e30"], "--seed must be at least 0 and below 2147483648"),  # was an OverflowError
    ("export.py", ["--license", "MTI"], "--license takes one of '', MIT, Apache-2.0, "),  # was a LICENSE for "MTI"
    ("export.py", ["--license", "MTI"], "not 'MTI' (did you mean MIT?)"),
    ("predict.py", ["--tta", "maybe"], "--tta takes one of auto, true, false, not 'maybe'"),
    ("data_cleaning.py", ["--max-member-mb", "0"], "--max-member-mb must be at least 1, not 0"),
])
def test_a_value_its_declaration_refuses_is_named_with_what_it_takes(scripts, script, argv, message):
    with pytest.raises(UserError) as refused:
        parse_settings(scripts[script], argv=argv)
    assert message in str(refused.value)


def test_help_lists_the_choices_and_the_bounds(scripts, capsys):
    with pytest.raises(SystemExit):
        parse_settings(scripts["train.py"], argv=["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model {unet,unetplusplus,attentionunet,segresnet,dynunet,efficientnet-lite0,efficientnet-b0," in text
    assert "(default: 1; at least 1)" in text  # --folds


@pytest.mark.parametrize(("config", "message"), [
    ({"count": True}, "--count takes a whole number, not true"),  # was taken as 1
    ({"rate": False}, "--rate takes a number, not false"),
    ({"name": None}, "--name takes a text, not null"),  # was the text "None" (a folder named None)
    ({"name": ["a"]}, '--name takes a text, not ["a"]'),
    ({"sizes": [1, None]}, "--sizes takes a whole number, not null"),
])
def test_a_json_value_of_the_wrong_kind_is_refused(namespace, tmp_path, config, message):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape(message)):
        parse_settings(namespace, argv=["--config", str(path)])


def test_a_json_true_for_a_word_setting_is_the_word(scripts, tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"tta": True}))
    assert parse_settings(scripts["predict.py"], argv=["--config", str(path)])["TTA"] == "true"


def test_a_settings_file_nested_too_deep_is_refused_in_one_line(namespace, tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("[" * 100_000 + "]" * 100_000)  # was a RecursionError
    with pytest.raises(UserError, match="settings.json nests too deep to be settings; write it as a flat JSON object"):
        parse_settings(namespace, argv=["--config", str(path)])


def test_a_value_that_starts_with_a_dash_gets_the_way_to_write_it(namespace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(namespace, argv=["--name", "-out"])
    assert exit_info.value.code == 2
    assert "for a value that starts with '-', write --name=-out" in capsys.readouterr().err
    assert parse_settings(namespace, argv=["--name=-out"])["NAME"] == "-out"


def test_a_huge_whole_number_is_read_exactly():
    assert convert("12345678901234567891", 0, "SEED") == 12345678901234567891
    assert convert("1e3", 0, "SEED") == 1000
    with pytest.raises(UserError, match="--rate takes a number, not 'nan'"):
        convert("nan", 0.5, "RATE")


def test_declarations_say_what_they_accept():
    assert Bounds(at_least=0, below=1).describe() == "at least 0 and below 1"
    assert OneOf(("a", "b"), or_file=True).describe() == "one of a, b or a file"
    Bounds(above=0).check(1e-9, "--x")
    with pytest.raises(UserError, match="--x must be above 0, not 0"):
        Bounds(above=0).check(0, "--x")


def test_options_md_is_generated_from_the_declarations():
    stale = "docs/options.md is stale: run python -m nerveseg.settings"
    assert (ROOT / "docs" / "options.md").read_text() == options_markdown(ROOT), stale


@pytest.mark.parametrize(("script", "config", "message"), [
    ("train.py", {"max_epochs": True}, "--max-epochs takes a whole number, not true"),  # was 1 epoch
    ("train.py", {"data_dir": None}, "--data-dir takes a text, not null"),  # was the folder "None"
])
def test_the_settings_files_of_issue_31_are_refused(scripts, tmp_path, script, config, message):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape(message)):
        parse_settings(scripts[script], argv=["--config", str(path)])


def test_an_output_named_like_an_option_gets_the_way_to_write_it(scripts, capsys):
    with pytest.raises(SystemExit):
        parse_settings(scripts["predict.py"], argv=["--output", "-out"])
    assert "write --output=-out" in capsys.readouterr().err
    assert parse_settings(scripts["predict.py"], argv=["--output=-out"])["OUTPUT"] == "-out"
