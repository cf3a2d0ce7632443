"""Which code produced a result: the commit recorded beside every benchmark's numbers."""
from __future__ import annotations

import os
import subprocess


def commit() -> str:
    """JSLORA_COMMIT if set (the lent GPU gets a copy of the working tree whose git metadata can lag),
    else the checkout's short HEAD, else ''."""
    found = os.environ.get("JSLORA_COMMIT", "")
    if not found:
        try:
            found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            found = ""
    return found
