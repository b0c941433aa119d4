"""Every shell and Python snippet of README.md runs as written, except those marked as needing weights, data or a
GPU (an HTML comment `<!-- readme-test: skip (reason) -->` right above the block). Extracted from the README itself,
so README and test cannot drift apart."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\n)?"
                    r"```(?P<lang>bash|python)\n(?P<code>.*?)```",
                    re.S)


def snippets():
    return [(m["lang"], m["code"], m["reason"]) for m in _BLOCK.finditer(README.read_text())]


def test_the_readme_has_exactly_two_setup_commands_and_runnable_snippets():
    blocks = snippets()
    assert sum("python3 -m venv .venv" in code for _, code, _ in blocks) == 2
    assert {lang for lang, _, reason in blocks if reason is None} == {"bash", "python"}


@pytest.mark.parametrize("lang,code", [(lang, code) for lang, code, reason in snippets() if reason is None])
def test_snippet_runs(lang, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README {lang} snippet failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr and "FutureWarning" not in proc.stderr
