"""The library's layering, read from the source with `ast` (every import, also those inside
functions and under TYPE_CHECKING, and `importlib.import_module` of a literal name):

- apr.decode and apr.serve (inference) use nothing of training, RL, the stages or the cluster;
- a stage (apr.stages.*) uses no other stage, and only the CLI, the KFP components and the
  benchmarks use the stages at all;
- only apr.cluster imports kfp or kubernetes;
- no module is a grab bag named utils, helpers or misc.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = ("apr.decode", "apr.serve")
NOT_FOR_INFERENCE = ("apr.train", "apr.rl", "apr.stages", "apr.cluster")
STAGE_USERS = ("apr.cli", "apr.stages", "components", "bench")  # (a stage: only itself)
CLUSTER_ONLY = ("kfp", "kubernetes")
GRAB_BAGS = {"util", "utils", "helper", "helpers", "misc"}


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, package: bool = False) -> set[str]:
    """Every module `source` imports, anywhere in it: `from a.b import c` counts as both a.b
    and a.b.c (c may be a module); relative imports are resolved against `module`."""
    here = module.split(".") if package else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out |= {f"{name}.{alias.name}" for alias in node.names if alias.name != "*"}
        elif isinstance(node, ast.Call) and node.args and (
                getattr(node.func, "attr", None) == "import_module"
                or getattr(node.func, "id", None) in ("import_module", "__import__")):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                out.add(first.value)
            elif isinstance(first, ast.JoinedStr) and first.values and isinstance(
                    first.values[0], ast.Constant):  # f"pkg.{x}": at least pkg
                out.add(str(first.values[0].value).rstrip("."))
    return out


def scan(*patterns: str) -> dict[str, set[str]]:
    """Module name -> what it imports, for the files under ROOT matching `patterns`."""
    files = sorted({p for pattern in patterns for p in ROOT.glob(pattern)})
    return {module_name(p): imports_of(p.read_text(), module_name(p), p.name == "__init__.py")
            for p in files}


def inference_breaks(modules: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imported in modules.items()
                  if any(under(m, p) for p in INFERENCE)
                  for i in imported if any(under(i, p) for p in NOT_FOR_INFERENCE))


def stage_breaks(modules: dict[str, set[str]]) -> list[str]:
    out = []
    for m, imported in modules.items():
        for i in imported:
            if not under(i, "apr.stages") or i == "apr.stages":
                continue  # the package itself is empty: only its modules count
            if under(m, "apr.stages"):
                if not under(i, m):
                    out.append(f"{m} imports another stage, {i}")
            elif not any(under(m, user) for user in STAGE_USERS):
                out.append(f"{m} imports the stage {i}")
    return sorted(out)


def cluster_breaks(modules: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imported in modules.items()
                  if under(m, "apr") and not under(m, "apr.cluster")
                  for i in imported if any(under(i, p) for p in CLUSTER_ONLY))


def grab_bags(modules) -> list[str]:
    return sorted(m for m in modules if GRAB_BAGS & set(m.split(".")))


@pytest.fixture(scope="module")
def library() -> dict[str, set[str]]:
    return scan("apr/**/*.py")


@pytest.fixture(scope="module")
def everything() -> dict[str, set[str]]:
    return scan("apr/**/*.py", "components/*.py", "bench/*.py", "pipelines/*.py")


def test_the_scan_reads_every_module_and_the_imports_inside_functions(everything):
    assert {"apr.cli", "apr.decode.engine", "apr.serve.app", "apr.stages.grpo",
            "apr.cluster.jobs", "components.grpo", "pipelines.apr_pipeline"} <= set(everything)
    assert "apr.cluster.grpo_job" in everything["components.grpo"]  # inside the component
    assert "apr.stages.grpo" in everything["apr.cli"]  # inside a CLI function
    assert "kubernetes.client" in everything["apr.cluster.jobs"]
    assert "pipelines.apr_pipeline" in everything["apr.cluster.pipeline"]  # import_module
    assert "components" in everything["apr.cluster.pipeline"]  # import_module(f"components.{s}")


def test_inference_uses_nothing_of_training_rl_stages_or_the_cluster(library):
    assert inference_breaks(library) == []


def test_a_stage_uses_no_other_stage_and_only_entry_points_use_stages(everything):
    assert stage_breaks(everything) == []
    users = {m for m, imported in everything.items() if not under(m, "apr.stages")
             and any(i.startswith("apr.stages.") for i in imported)}
    assert "apr.cli" in users and any(under(u, "components") for u in users)


def test_only_the_cluster_package_imports_kfp_or_kubernetes(library):
    assert cluster_breaks(library) == []


def test_no_module_is_named_utils_helpers_or_misc(library):
    assert grab_bags(library) == []
    assert grab_bags(p.stem for p in ROOT.glob("apr/**") if p.is_dir()) == []


@pytest.mark.parametrize("module, source, check, expected", [
    ("apr.decode.local", "def f():\n    from apr.rl import trainer\n", inference_breaks,
     ["apr.decode.local imports apr.rl", "apr.decode.local imports apr.rl.trainer"]),
    ("apr.serve.app", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    import apr.cluster.jobs\n", inference_breaks, ["apr.serve.app imports apr.cluster.jobs"]),
    ("apr.decode.runtime", "from ..stages import grpo\n", inference_breaks,
     ["apr.decode.runtime imports apr.stages", "apr.decode.runtime imports apr.stages.grpo"]),
    ("apr.decode.runtime", "from apr.countdown import threads\n", inference_breaks, []),
    ("apr.stages.grpo", "def f():\n    from apr.stages.sft import save_checkpoint\n",
     stage_breaks, ["apr.stages.grpo imports another stage, apr.stages.sft",
                    "apr.stages.grpo imports another stage, apr.stages.sft.save_checkpoint"]),
    ("apr.stages.grpo", "from . import sft\n", stage_breaks,
     ["apr.stages.grpo imports another stage, apr.stages.sft"]),
    ("apr.rl.trainer", "from apr.stages.grpo import GRPOConfig\n", stage_breaks,
     ["apr.rl.trainer imports the stage apr.stages.grpo",
      "apr.rl.trainer imports the stage apr.stages.grpo.GRPOConfig"]),
    ("apr.cluster.pipeline", "import importlib\nimportlib.import_module('apr.stages.sft')\n",
     stage_breaks, ["apr.cluster.pipeline imports the stage apr.stages.sft"]),
    ("components.sft", "from apr.stages import sft\n", stage_breaks, []),
    ("apr.storage", "def f():\n    import kubernetes.client\n", cluster_breaks,
     ["apr.storage imports kubernetes.client"]),
    ("apr.stages.publish", "from kfp import dsl\n", cluster_breaks,
     ["apr.stages.publish imports kfp", "apr.stages.publish imports kfp.dsl"]),
    ("apr.cluster.jobs", "from kubernetes import client\n", cluster_breaks, []),
    ("apr.train.utils", "", grab_bags, ["apr.train.utils"]),
    ("apr.misc.tools", "", grab_bags, ["apr.misc.tools"]),
])
def test_each_rule_catches_a_module_that_breaks_it(module, source, check, expected):
    assert check({module: imports_of(source, module)}) == expected
