# SPDX-License-Identifier: BSD-2-Clause
from machinepy.cli import entry

entry()
