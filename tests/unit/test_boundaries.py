"""Import boundaries between the parts (contracts in pyproject.toml), checked by import-linter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import REPO


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
