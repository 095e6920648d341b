"""The README's runnable example runs as written (in a subprocess, as a user would run the script)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from celery_serve._runtime.launcher import free_port

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_quickstart_script_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    script = next(b for b in blocks if b.startswith("# greeter.py"))
    path = tmp_path / "greeter.py"
    path.write_text(script.replace("port=8765", f"port={free_port()}"))  # a free port, as every test uses
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
