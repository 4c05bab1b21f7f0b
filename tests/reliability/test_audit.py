"""Static audit of src/: every pickle qwenlink reads goes through the safe loaders.

Allowed: checkpoint/safe_load.py (torch.load(weights_only=True) + allow-list) and checkpoint/safe_dcp.py (DCP's
metadata unpickler and planner). Anywhere else a torch.load / pickle.load(s) / np.load(allow_pickle=True), or a DCP
load without qwenlink's safe reader, is a finding: a downloaded file could run code.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "qwenlink"
SAFE_MODULES = {"checkpoint/safe_load.py", "checkpoint/safe_dcp.py"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call):
        parts.append(_dotted(node.func) + "()")
    return ".".join(reversed(parts))


def _findings(path: Path, rel: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{rel}:{node.lineno}: {name}"
        if name.endswith(("pickle.load", "pickle.loads", "Unpickler")):
            found.append(where)
        elif name in ("torch.load", "torch.serialization.load"):
            found.append(where)
        elif name.endswith("np.load") or name.endswith("numpy.load"):
            allow = keywords.get("allow_pickle")
            if not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} without allow_pickle=False")
        elif name.endswith(".load") and ("dcp" in name or "checkpoint" in name) and "storage_reader" not in keywords:
            found.append(f"{where} without qwenlink's storage_reader")
        elif name.endswith("FileSystemReader"):
            found.append(where)
    return [] if rel in SAFE_MODULES else found


def test_no_unsafe_unpickling_outside_the_safe_loaders() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    findings = [f for path in files for f in _findings(path, path.relative_to(SRC).as_posix())]
    assert not findings, "unsafe loading in src/:\n" + "\n".join(findings)


def test_the_audit_sees_what_it_should(tmp_path) -> None:
    """The checker itself: each pattern it must catch."""
    bad = tmp_path / "probe.py"
    bad.write_text("import torch, pickle, numpy as np\n"
                   "torch.load('x')\npickle.loads(b'')\nnp.load('x.npy')\n"
                   "import torch.distributed.checkpoint as dcp\ndcp.load({}, checkpoint_id='x')\n", encoding="utf-8")
    assert len(_findings(bad, "probe.py")) == 4, _findings(bad, "probe.py")
    assert _findings(bad, "checkpoint/safe_load.py") == []
