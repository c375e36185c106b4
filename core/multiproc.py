"""Prometheus multiprocess mode: where the processes of one `plunkd serve` keep their samples. Apart from
`core.metrics` because it must run before prometheus_client is first imported."""

from __future__ import annotations

import os
from pathlib import Path

from core.files import private_dir

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_metrics(data_dir: str) -> Path:
    """Prometheus multiprocess mode in `<data_dir>/metrics`, inherited by the dispatcher process, so the
    API's /metrics shows both processes' samples. It must run before prometheus_client is first
    imported (which fixes how samples are stored), so it lives here and not in `core.metrics`. A
    process that finds the variable set (a child, or the operator's own folder) uses it as it is;
    otherwise files of processes no longer alive are removed first (a restart starts the counters from
    zero, while a dispatcher restarted by its parent adds to its predecessor's, whose files stay)."""
    existing = os.environ.get(MULTIPROC_ENV)
    if existing:
        return Path(existing)
    folder = private_dir(Path(data_dir) / "metrics")
    for path in folder.glob("*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
