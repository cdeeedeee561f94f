# SPDX-License-Identifier: BSD-2-Clause
from machinepy.main import entry

entry()
