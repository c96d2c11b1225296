"""Launching helpers shared by the DDP tests (not a test module)."""
import shutil, sys
from pathlib import Path

import pytest


def torchrun(nproc: int = 2) -> list[str]:
    "The command that starts `nproc` local ranks with torchrun (skips the test when torchrun is not installed)."
    exe = shutil.which('torchrun') or str(Path(sys.executable).with_name('torchrun'))
    if not Path(exe).exists(): pytest.skip('torchrun is not installed')
    return [exe, '--standalone', '--nproc_per_node', str(nproc)]
