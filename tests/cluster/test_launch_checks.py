"""``tools/launch.py`` refuses, before anything is queued, node counts the recipe's layout cannot
use and layouts the planner says do not fit, naming the numbers and the nearest node counts that
work; it refuses to guess the trainers' environment; and the README's and docs' launch commands
use the node counts the recipes are laid out for (``H100_GPUS``)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megatron_vlm.cluster.launch import main as launch_main
from megatron_vlm.planning.layouts import GIB, evaluate
from megatron_vlm.recipes.kimi import H100_GPUS
from tools.plan_parallel import build_inputs, parse_args, recipe_layout
from tools.plan_parallel import main as plan_main

REPO = Path(__file__).resolve().parents[2]
IMAGE = ["--container-image", "/lustre/images/megatron_vlm.sqsh"]
# Real-size recipes need their tokenizer and data (data.require_inputs); nothing is read here.
DATA = ["data.tokenizer=/lustre/ckpt/Kimi-K2.5", "data.multimodal.root=/lustre/data/shards"]


def _refusal(argv: list[str], capsys) -> str:
    assert launch_main([*argv, *IMAGE, "--dry-run", *DATA]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no script
    return " ".join(captured.err.split())


def _planned_peak_gib(recipe: str, gpus: int, *overrides: str) -> float:
    """The busiest GPU's memory by the planner's own CLI path (tools/plan_parallel.py)."""
    job, inputs = build_inputs(parse_args(["--recipe", recipe, "--gpus", str(gpus), *overrides]))
    return evaluate(inputs, recipe_layout(job, gpus)).peak_memory / GIB


@pytest.mark.parametrize(("nodes", "below", "above"), [(1, None, 64), (65, 64, 128),
                                                       (100, 64, 128)])
def test_kimi_k25_on_a_node_count_its_layout_cannot_use(nodes, below, above, capsys):
    """tp8 pp16 cp1 = 128 GPUs per replica = 16 nodes of 8: world sizes must be multiples of 128
    (ep8 x etp1 then divides dp*cp*tp = 8 dp). 16 and 32 nodes divide but do not fit 80 GB (Muon
    state and fp32 masters sharded over dp 1 and 2), so the nearest that work are 64 and 128."""
    assert plan_main(["--recipe", "kimi_k25", "--gpus", "128", "--check"]) == 1
    assert plan_main(["--recipe", "kimi_k25", "--gpus", "256", "--check"]) == 1
    assert plan_main(["--recipe", "kimi_k25", "--gpus", "512", "--check"]) == 0
    capsys.readouterr()
    err = _refusal(["--recipe", "kimi_k25", "--nodes", str(nodes), "--gpus-per-node", "8"], capsys)
    assert f"world size {nodes * 8} is not divisible by tp*pp*cp=128" in err
    assert f"{nodes} node{'s' if nodes > 1 else ''} x 8 GPUs = {nodes * 8} GPUs" in err
    for side, count in (("below", below), ("above", above)):
        if count is None:
            assert f"{side}: none" in err
        else:
            peak = _planned_peak_gib("kimi_k25", count * 8)
            assert (f"{side}: {count} nodes ({count * 8} GPUs, dp{count * 8 // 128}: planned "
                    f"peak {peak:.1f} GiB per GPU)") in err
    assert "laid out for 1024 GPUs = 128 nodes x 8" in err


def test_expert_grid_that_does_not_divide_is_refused(capsys):
    """kimi_vl_a3b: tp2 ep8 etp1 needs ep*etp = 8 to divide dp*cp*tp = world size: 6 GPUs
    (3 nodes x 2) divide tp*pp*cp = 2 but not the expert grid; 8 GPUs (4 nodes) is the nearest."""
    err = _refusal(["--recipe", "kimi_vl_a3b", "--nodes", "3", "--gpus-per-node", "2"], capsys)
    assert "ep=8 x etp=1 must divide dp*cp*tp=6 (world size 6 / pp=1)" in err
    peak = _planned_peak_gib("kimi_vl_a3b", 8)
    assert "below: none" in err  # 2 and 4 GPUs: the expert grid again
    assert f"above: 4 nodes (8 GPUs, dp4: planned peak {peak:.1f} GiB per GPU)" in err
    assert "laid out for 64 GPUs = 32 nodes x 2" in err


def test_layout_the_planner_says_does_not_fit_is_refused_with_its_numbers(capsys):
    # 32 nodes: the world size suits the layout, the memory does not (see the docstring above).
    err = _refusal(["--recipe", "kimi_k25", "--nodes", "32"], capsys)
    peak = _planned_peak_gib("kimi_k25", 256)
    assert peak > 74.0
    assert "does not fit 32 nodes x 8 GPUs = 256 GPUs (80 GiB each)" in err
    assert f"needs {peak:.1f} GiB" in err and "> 74 GiB usable" in err
    assert "above: 64 nodes (512 GPUs" in err
    # The planned 128 nodes fit 80 GB GPUs (64.7 GiB) but not 64 GB ones (58 usable).
    assert _planned_peak_gib("kimi_k25", 1024) > 58.0
    err = _refusal(["--recipe", "kimi_k25", "--nodes", "128", "--gpu-memory", "64"], capsys)
    assert f"needs {_planned_peak_gib('kimi_k25', 1024):.1f} GiB" in err
    assert "> 58 GiB usable" in err


def test_no_container_or_venv_is_refused_unless_the_nodes_python_is_asked_for(capsys):
    assert launch_main(["--recipe", "tiny_text_cpu", "--gpus-per-node", "1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert all(flag in err for flag in ("--container-image", "--venv", "--system-python"))
    assert launch_main(["--recipe", "tiny_text_cpu", "--gpus-per-node", "1", "--system-python",
                        "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "source " not in script and "--container-image" not in script
    assert "python -m torch.distributed.run" in script


def _laid_out_gpus() -> dict[str, int]:
    """Recipe -> H100 GPUs of every real-size recipe: Kimi's and each registered family's
    (``families/<name>/recipes.py``'s ``H100_GPUS``, where it has one)."""
    import importlib

    from megatron_vlm.config.families import FAMILY_MODULES

    gpus = dict(H100_GPUS)
    for module in FAMILY_MODULES.values():
        try:
            recipes = importlib.import_module(module + ".recipes")
        except ModuleNotFoundError:
            continue
        gpus.update(getattr(recipes, "H100_GPUS", {}))
    return gpus


ALL_H100_GPUS = _laid_out_gpus()


@pytest.mark.parametrize("recipe", sorted(ALL_H100_GPUS))
def test_every_recipe_renders_on_the_nodes_it_is_laid_out_for(recipe, capsys):
    nodes = ALL_H100_GPUS[recipe] // 8
    assert launch_main(["--recipe", recipe, "--nodes", str(nodes), *IMAGE, "--dry-run",
                        *DATA]) == 0
    script = capsys.readouterr().out
    assert f"#SBATCH --nodes={nodes}\n" in script and "--nproc-per-node=8" in script
    assert "#SBATCH --cpus-per-task=64\n" in script


def _launch_commands(text: str) -> list[list[str]]:
    """Every ``python tools/launch.py ...`` command in ``text`` (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(m.group(1)) for m in re.finditer(r"tools/launch\.py (.*)", joined)]


def test_readme_and_docs_launch_the_node_counts_the_recipes_are_laid_out_for(capsys):
    """Each documented real-size launch asks for H100_GPUS of its recipe, and launch accepts the
    README's command as written; docs/recipes.md's table gives the same node counts."""
    seen = []
    for doc in ("README.md", "docs/recipes.md"):
        for argv in _launch_commands((REPO / doc).read_text()):
            argv = [a.strip("`") for a in argv if a not in ("...", "...`.")]
            recipe = argv[argv.index("--recipe") + 1]
            if recipe not in H100_GPUS:
                continue
            nodes = int(argv[argv.index("--nodes") + 1])
            gpn = int(argv[argv.index("--gpus-per-node") + 1])
            assert nodes * gpn == H100_GPUS[recipe], (doc, argv)
            seen.append(doc)
            if doc == "README.md":
                assert launch_main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    assert set(seen) == {"README.md", "docs/recipes.md"}
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) \((\d+) nodes x 8\)",
                      (REPO / "docs/recipes.md").read_text(), re.MULTILINE)
    assert {name for name, *_ in rows} == set(H100_GPUS)
    for name, gpus, nodes in rows:
        assert int(gpus.replace(",", "")) == H100_GPUS[name] == 8 * int(nodes)


def test_real_recipe_without_tokenizer_or_data_never_queues(capsys):
    """kimi_k25 with no data.tokenizer / data.multimodal.root is refused before sbatch."""
    from megatron_vlm.cluster.launch import main

    rc = main(["--recipe", "kimi_k25", "--nodes", "128", "--gpus-per-node", "8",
               "--container-image", "/x.sqsh", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "data.tokenizer" in err and "data.multimodal.root" in err
