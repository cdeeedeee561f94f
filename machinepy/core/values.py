# SPDX-License-Identifier: BSD-2-Clause
"""Text → value, as systemd reads it: booleans and signals, for every front-end
(the command line's options, unit properties, `machinepy kill --signal`).

ValueError on bad input; callers word it for their context.
"""

from __future__ import annotations

import signal

# systemd's parse_boolean().
BOOLEANS = {"1": True, "yes": True, "y": True, "true": True, "t": True, "on": True,
            "0": False, "no": False, "n": False, "false": False, "f": False, "off": False}


def parse_bool(text: str) -> bool:
    try:
        return BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError(f"expected yes or no, got '{text}'") from None


def parse_signal(text: str) -> int:
    """systemd's signal_from_string(): SIGTERM, TERM, 15, SIGRTMIN+3 or RTMIN+3."""
    name = text if text.startswith("SIG") else f"SIG{text}"
    if text.isascii() and text.isdigit():  # isdigit() alone also takes '²'
        number = int(text)
    elif name.startswith("SIGRTMIN+") and name[9:].isascii() and name[9:].isdigit():
        number = int(signal.SIGRTMIN) + int(name[9:])
    else:
        number = int(signal.Signals[name]) if name in signal.Signals.__members__ else 0
    if not 0 < number < signal.NSIG:
        raise ValueError(f"unknown signal '{text}'")
    return number
