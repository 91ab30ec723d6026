"""The docs site builds with `mkdocs build --strict` (a broken link, anchor or nav entry fails), and the
front door holds: README of at most 150 lines whose command (b) is what CI runs, the licence, citation
and changelog present, one lint configuration."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "evaluate_methods" in api and "MethodEvaluator" in api  # mkdocstrings rendered the package
    bundle = (tmp_path / "site" / "bundles" / "nexus_inr" / "index.html").read_text()
    assert "Nexus-INR" in bundle  # the bundle's own README, included


def test_readme_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150)"
    b = lines[lines.index(next(ln for ln in lines if ln.startswith("# (b)"))) + 1]
    assert "pytest" in b and b.startswith("pip install -r requirements.txt")  # what .ci/run executes
    a = lines[lines.index(next(ln for ln in lines if ln.startswith("# (a)"))) + 1]
    assert "--ckpt_dir runs/nexus_inr/models" in a and "--weights nexus_inr=runs/nexus_inr/models/model.pt" in a


def test_licence_citation_changelog_and_one_lint_config():
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] and cff["title"] and cff["authors"] and cff["license"] == "Apache-2.0"
    assert len(cff["references"]) >= 2  # the two papers
    assert (REPO / "CHANGELOG.md").read_text().startswith("# Changelog")
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["options"]["python_requires"] == ">=3.10"
    assert not {"flake8", "isort"} & set(cfg.sections()) and (REPO / "ruff.toml").is_file()
