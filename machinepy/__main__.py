# SPDX-License-Identifier: BSD-2-Clause
import sys

from machinepy.cli import main

sys.exit(main())
