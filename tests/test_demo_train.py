"""The demo's training script ships in the package; torch, which only training needs, is not a dependency."""

from __future__ import annotations

import subprocess
import sys


def test_training_module_imports_without_torch():
    blocked = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
    proc = subprocess.run([sys.executable, "-c", blocked + "import jaxmoe.demo.train as t; t.parse_args([])"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
