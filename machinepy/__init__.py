# SPDX-License-Identifier: BSD-2-Clause
"""machinepy: Linux containers in the spirit of pflask and systemd-nspawn."""

__version__ = "0.1.0"
