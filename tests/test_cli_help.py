"""`nexus-sr` explains itself: every command's --help has a description, an example, help on every
option, defaults shown; --version; a missing default bundle is a one-line error with a hint."""

from __future__ import annotations

import re

import pytest

import nexus_monai
from nexus_monai.cli import build_parser, main
from nexus_monai.cli.help import DESCRIPTIONS, EXAMPLES

COMMANDS = ["synth", "degrade", "upsample", "baseline", "predict", "evaluate", "benchmark", "serve", "fit-subject",
            "experiment"]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_every_command_is_covered():
    listed = set(re.findall(r"\{([^}]*)\}", build_parser().format_usage())[0].split(","))
    assert listed == set(COMMANDS) == set(DESCRIPTIONS) == set(EXAMPLES)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_description_example_and_option_help(command, capsys):
    text = _help(capsys, command)
    assert DESCRIPTIONS[command] in " ".join(text.split())
    assert "example:" in text and f"nexus-sr {command}" in text.split("example:")[1]
    options = text.split("options:")[1].split("example:")[0]
    # each option line has help text: an option name alone on its line must be followed by an indented help line
    lines = [ln for ln in options.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if re.match(r"^  -", line) and len(line.split("  ")) < 3 and line.strip().split()[0] != "-h,":
            follow = lines[i + 1] if i + 1 < len(lines) else ""
            assert re.match(r"^\s{8,}\S", follow), f"{command}: no help for {line.strip()}"
    # the example's options exist in the parser (an example that runs, not a made-up flag)
    example_options = set(re.findall(r"(--[a-z][a-z0-9-]*)", EXAMPLES[command]))
    assert example_options <= set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def test_defaults_are_shown(capsys):
    text = _help(capsys, "synth")
    assert "(default: 8)" in text and "(default: 0)" in text  # --subjects, --seed (0 is a default too)
    text = " ".join(_help(capsys, "serve").split())
    assert "(default: 8000)" in text and "(default: 127.0.0.1)" not in text  # its help already states it


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"nexus-sr {nexus_monai.__version__}"


def test_missing_default_bundle_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEXUS_MONAI_BUNDLES", str(tmp_path))  # as if installed without the checkout's bundles
    code = main(["predict", "--t1", "a.nii.gz", "--t2", "b.nii.gz", "--spacing", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and "pass --bundle" in err
