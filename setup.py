"""Build script: setup.cfg holds the metadata; this adds the protocol YAMLs to the wheel.

The acquisition protocols live in the repository's top-level ``transforms/`` (one place to edit
them). ``build_py`` copies them into the built package as ``nexus_monai/protocols/``, so a plain,
non-editable ``pip install .`` can read them with ``importlib.resources``
(``nexus_monai.transforms.protocols.protocols_dir``); a source checkout reads ``transforms/``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtocols(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "nexus_monai" / "protocols"
        target.mkdir(parents=True, exist_ok=True)
        for yaml_file in sorted((ROOT / "transforms").glob("*.yaml")):
            shutil.copy2(yaml_file, target / yaml_file.name)


setup(cmdclass={"build_py": BuildPyWithProtocols})
