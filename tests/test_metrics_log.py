"""Issue 22: a failed append to metrics.jsonl leaves the file whole (one line, exit 2), and a resume
drops a torn last line (as older versions left after a full disk) with one message."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from blitext.errors import BlitextError
from blitext.training import MetricsLog, read_metrics

# The file-size limit stands in for a full disk: a write past it is cut short, the next fails (EFBIG).
APPEND_UNTIL_FULL = """
import resource, signal, sys
from pathlib import Path
from blitext.errors import BlitextError
from blitext.training import MetricsLog
log = MetricsLog(Path(sys.argv[1]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    for step in range(1000):
        log.write({"step": step, "loss": 1.0 / (step + 1), "lr": 1e-4})
except BlitextError as e:
    print(e)
    sys.exit(2)
"""


def test_a_failed_metrics_append_leaves_the_file_whole_and_is_one_line(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", APPEND_UNTIL_FULL, str(path), "1000"], capture_output=True,
                          text=True, timeout=600)  # importing torch is slow on a busy machine
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr and str(path.parent) in proc.stdout
    text = path.read_text()
    assert text.endswith("\n") and 0 < len(text) <= 1000
    steps = [json.loads(line)["step"] for line in text.splitlines()]  # every line whole
    assert steps == list(range(len(steps)))
    MetricsLog(path, resume_step=len(steps)).write({"step": len(steps), "loss": 0.5})  # the resume appends
    assert [m["step"] for m in read_metrics(path)] == list(range(len(steps) + 1))


def test_a_resume_drops_a_torn_last_line_and_says_so(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(4)) + '{"step": 4, "lo')
    log = MetricsLog(path, resume_step=3)
    assert "torn" in capsys.readouterr().err
    log.write({"step": 3, "loss": 0.5})
    assert [m["step"] for m in read_metrics(path)] == [0, 1, 2, 3]


def test_a_damaged_line_inside_the_log_is_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(BlitextError, match="line 2"):
        MetricsLog(path, resume_step=2)
