"""Issue 17's done-when: the bad-input campaign (tests/bad_input_campaign.py) run again finds no silently wrong
result and no traceback: every case is a clear one-line error."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_bad_input_of_the_campaign_is_a_clear_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bad_input_campaign.py")], capture_output=True,
                          text=True, timeout=900, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
    summary = done.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"(\d+) bad inputs: (\d+) clear one-line errors, 0 silently wrong \(exit 0\), 0 traceback "
                         r"or unclear", summary)
    assert done.returncode == 0 and found, done.stdout[-4000:] + done.stderr[-2000:]
    assert int(found[1]) == int(found[2]) >= 200
