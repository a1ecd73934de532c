"""The local backend: one process on this machine runs every block of every chain."""
from __future__ import annotations

import os
from pathlib import Path

from planc.program import Program
from planc.templating import render


class LocalBackend:
    name = "local"

    def emit(self, program: Program, root: Path, ctx) -> dict[str, str]:
        variants = list(program.chains)
        files = {
            "run.py": render("local/run.py.j2", variants=variants, default_variant=variants[0]),
            "README.md": render("local/README.md.j2", variants=variants, base=program.spec.base.name,
                                chains=program.chains),
        }
        for name, text in files.items():
            (root / name).write_text(text)
        os.chmod(root / "run.py", 0o755)
        return {"run": "run.py", "readme": "README.md"}
