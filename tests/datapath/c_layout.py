"""Sizes and offsets as the C compiler lays them out, for tests that mirror C structs.

Compiles a tiny program with the host's `cc` that includes the real headers and prints
each requested expression; nothing is written by hand on the C side.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


def c_values(expressions: Sequence[str], includes: Sequence[str] = ("egress_maps.h",)) -> dict[str, int]:
    """{expression: value} for integer constant expressions such as sizeof(struct x)
    or offsetof(struct x, field), evaluated by cc with bpf/ on the include path."""
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/types.h>",
        *(
            f"#include <{header}>" if header.startswith("linux/") else f'#include "{header}"'
            for header in includes
        ),
        "int main(void) {",
        *(f'    printf("%llu\\n", (unsigned long long)({expression}));' for expression in expressions),
        "    return 0;",
        "}",
    ]
    with tempfile.TemporaryDirectory(prefix="egress-top-layout-") as tmp:
        source, binary = Path(tmp) / "layout.c", Path(tmp) / "layout"
        source.write_text("\n".join(lines) + "\n")
        subprocess.run(
            ["cc", "-I", str(BPF_DIR), "-o", str(binary), str(source)], check=True, capture_output=True
        )
        output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(expressions, map(int, output), strict=True))
