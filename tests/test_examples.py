"""The examples run in the suite, so they never rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_demo_survives_kill_9_and_repeats_no_finished_step(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every step that finished before the crash ran once: True" in done.stdout
    assert "status    completed" in done.stdout
    assert (tmp_path / ".corral" / "corral.db").exists()  # the embedded default store
