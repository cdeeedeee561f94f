# SPDX-License-Identifier: BSD-2-Clause
"""Build steps beyond pyproject.toml: machinepy(1), generated from the command line's
parsers (machinepy.docgen) while building, installed as share/man/man1/machinepy.1
(no copy of the page is kept in the tree); and units/, copied into the package as
machinepy/data/units, so `machinepy install-units` works from a wheel."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
MAN_PAGE = "build/man/machinepy.1"  # relative: setuptools wants data_files so


class BuildWithManPage(build_py):
    def run(self) -> None:
        super().run()
        units = Path(self.build_lib) / "machinepy" / "data" / "units"
        units.mkdir(parents=True, exist_ok=True)
        for f in sorted((HERE / "units").iterdir()):
            shutil.copyfile(f, units / f.name)
        sys.path.insert(0, str(HERE))  # the tree being built, not an installed machinepy
        try:
            from machinepy.docgen import manpage
        finally:
            sys.path.pop(0)
        out = HERE / MAN_PAGE
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(manpage())


os.chdir(HERE)
setup(cmdclass={"build_py": BuildWithManPage},
      data_files=[("share/man/man1", [MAN_PAGE])])
