"""What machine this is, in words a speed or accuracy figure can name (no torch: analysis uses it too)."""

from __future__ import annotations

from pathlib import Path


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (``Intel(R) Xeon(R) Processor``); ``unknown CPU`` where it cannot be read."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
