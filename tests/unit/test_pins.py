"""The suite stays green on a fresh machine: every package the tests compare against or read formats
from is pinned with ``==`` in the CPU constraints file, the pins are what is installed, and no test
reaches into transformers' private names (a new transformers release must not break the suite).
"""

from __future__ import annotations

import ast
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints-cpu.txt"

#: Packages the suite compares against (reference models, processors, quantisation) or whose
#: formats it reads and writes (shards, media, tensors, tokenizers, chat templates).
MUST_PIN = (
    "torch", "megatron-core", "transformers", "tokenizers", "compressed-tensors",
    "megatron-energon", "webdataset", "decord", "av", "safetensors", "sentencepiece", "tiktoken",
    "numpy", "pillow", "jinja2", "ruff", "pyarrow", "keye-vl-utils", "opencv-python-headless",
    "einops",
)

_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(text: str) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line (comments and ranges ignored)."""
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line.split("#", 1)[0])
        if m:
            pins[_canonical(m.group(1))] = m.group(2)
    return pins


def test_pin_parser_sees_only_exact_pins():
    pins = pinned_versions("a==1.0\nb>=2\n# c==3\nD_e==4.5 ; python_version >= '3.11'\n")
    assert pins == {"a": "1.0", "d-e": "4.5"}


def test_every_compared_package_is_pinned_exactly():
    pins = pinned_versions(CONSTRAINTS.read_text())
    missing = [name for name in MUST_PIN if _canonical(name) not in pins]
    assert not missing, f"{CONSTRAINTS.name} lacks an == pin for {missing}"


@pytest.mark.parametrize("name", MUST_PIN)
def test_installed_version_is_the_pinned_one(name):
    """What the suite ran against is what the constraints file says (a local build tag such as
    torch's ``+cpu`` is ignored)."""
    pinned = pinned_versions(CONSTRAINTS.read_text())[_canonical(name)]
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{name} is pinned but not installed: run tools/setup_cpu.sh")
    assert installed.split("+")[0] == pinned, (name, installed, pinned)


def _private_transformers_uses(tree: ast.AST) -> list[str]:
    """Names starting with ``_`` reached through transformers: imported from a transformers
    module, attributes of a name bound to a transformers import, or transformers modules whose
    dotted path has a private part."""
    bound: set[str] = set()  # local names bound to transformers modules/objects
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "transformers":
                    if any(p.startswith("_") for p in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            if any(p.startswith("_") for p in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module}")
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            # importlib.import_module("transformers.x") / pytest.importorskip("transformers.x")
            text = node.args[0].value
            if isinstance(text, str) and text.startswith("transformers"):
                if any(p.startswith("_") for p in text.split(".")):
                    found.append(f"line {node.lineno}: {text}")
                if isinstance(node.func, ast.Attribute) and node.func.attr in (
                        "importorskip", "import_module"):
                    parent = _assigned_name(tree, node)
                    if parent:
                        bound.add(parent)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and _root_name(node) in bound):
            found.append(f"line {node.lineno}: {_root_name(node)}...{node.attr}")
    return found


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _assigned_name(tree: ast.AST, call: ast.Call) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and node.value is call and len(node.targets) == 1:
            target = node.targets[0]
            return target.id if isinstance(target, ast.Name) else None
    return None


def test_scan_finds_private_transformers_names():
    """The scan itself can fail: each form of reaching a private name is caught."""
    src = """
import transformers.models.kimi_k25.modeling_kimi_k25 as m
from transformers.models.kimi_k25.modeling_kimi_k25 import _private_fn
from transformers.utils import public_fn
import pytest
proc = pytest.importorskip("transformers.models.kimi_k25.processing_kimi_k25")
m._helper(1)
proc.Kimi_K25Processor._get_num_multimodal_tokens(None)
public_fn._cache
"""
    found = _private_transformers_uses(ast.parse(src))
    assert len(found) == 4, found
    clean = "from transformers import AutoConfig\nAutoConfig.from_pretrained('x').__class__\n"
    assert _private_transformers_uses(ast.parse(clean)) == []


def test_no_test_uses_a_private_transformers_name():
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        found = _private_transformers_uses(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, f"private transformers names in tests: {offenders}"
