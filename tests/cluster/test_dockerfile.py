"""The GPU image's Dockerfile, checked statically (no Docker here): NGC PyTorch base at a pinned
release, the container's torch never reinstalled, the package installed under constraints made
from the container's own GPU stack (verified unchanged afterwards), no PyPI package that merely
shares the name of NVIDIA's fused-kernel library, and the CPU pins kept out of it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The unrelated PyPI package shares the name of NVIDIA's library (which the container ships).
PYPI_NAMESAKE = "Apex".lower()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _pip_installs() -> list[list[str]]:
    """The argument lists of every ``pip install`` in RUN instructions."""
    installs = []
    for keyword, args in _instructions():
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in {"&&", "||", ";", "|", "&"}:  # end of one simple command
                for i in range(len(command) - 1):
                    if command[i].endswith("pip") and command[i + 1] == "install":
                        installs.append(command[i + 2:])
                command = []
            else:
                command.append(token)
    return installs


def test_base_is_ngc_pytorch_at_a_pinned_release():
    instructions = _instructions()
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    (base,) = [a for k, a in instructions if k == "FROM"]
    image = args[base[2:-1]] if base.startswith("${") else base
    repo, _, tag = image.rpartition(":")
    assert repo == "nvcr.io/nvidia/pytorch"
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), tag  # a release, never 'latest'


def test_torch_is_never_reinstalled_and_installs_are_constrained():
    installs = _pip_installs()
    assert installs, "the Dockerfile installs the package"
    for words in installs:
        packages = [w for w in words if not w.startswith("-")]
        for w in packages:
            name = re.split(r"[<>=!~\[ ]", w, maxsplit=1)[0].lower()
            assert name not in {"torch", "torchvision", "torchaudio", "triton"}, words
            assert name != PYPI_NAMESAKE, words
        assert not {"--force-reinstall", "-U", "--upgrade", "--ignore-installed"} & set(words)
        assert "-c" in words, f"unconstrained pip install: {words}"
        constraints = words[words.index("-c") + 1]
        assert constraints == "/opt/container-gpu-stack.txt"


def test_constraints_come_from_the_container_and_are_verified_after():
    runs = [a for k, a in _instructions() if k == "RUN"]
    made = [r for r in runs if "> /opt/container-gpu-stack.txt" in r]
    assert made and "pip list --format=freeze" in made[0]
    assert "^torch==" in made[0]  # the build stops if torch was not found
    install = [r for r in runs if "pip install" in r]
    assert runs.index(made[0]) < runs.index(install[0])
    assert "cmp - /opt/container-gpu-stack.txt" in install[0]
    assert "transformer_engine" in install[0] and "flash_attn" in install[0]


def test_cpu_pins_stay_on_the_cpu_path():
    text = (REPO / "Dockerfile").read_text()
    assert "constraints-cpu.txt" not in "".join(a for _, a in _instructions())
    assert "torch==2.13.0" in (REPO / "constraints-cpu.txt").read_text()
    assert PYPI_NAMESAKE not in text  # not even in a comment: the library is 'Apex', NVIDIA's
