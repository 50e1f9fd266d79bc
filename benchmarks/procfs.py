"""Per-process figures from Linux ``/proc``, for the benchmarks that watch a job's processes."""

from __future__ import annotations

import os
from pathlib import Path


def process_stats() -> dict[int, list[str]]:
    """pid → the fields of ``/proc/PID/stat`` after the command name (``fields[0]`` is field 3,
    the state), for every process alive now."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        stats[int(entry)] = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    return stats
