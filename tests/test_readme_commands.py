"""Every command the README shows is run by a test, or says why it cannot run here.

The commands are parsed out of README.md's ```bash blocks (plus the few the prose names), so a
command added to the README without a test, or a registry entry left behind by an edit, fails
`test_every_readme_command_has_an_entry`. A command whose test runs it "as written" runs the
README's text itself, shrunk only by overrides that do not change what it does (fewer samples,
a tmp output or cache directory, `<time>` filled with a real directory). A command that needs
what a CI machine lacks (a GPU, real weights, a cluster, an account) or only its last tier
has (vLLM's CPU build) names that and the tests that check as much of it as can be checked.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands(text: str) -> list[str]:
    """The command lines of the text's ```bash blocks: backslash continuations joined, comment
    lines dropped, a trailing `# comment` cut (a `#` inside quotes is kept)."""
    commands: list[str] = []
    inside, pending = False, ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            inside = not inside and line == "```bash"
            continue
        if not inside or not line or line.startswith("#"):
            continue
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        commands.append(_cut_comment(line))
    return commands


def _cut_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i > 0 and line[i - 1].isspace():
            return line[:i].rstrip()
    return line


# Commands the prose names in `backticks` (not in a bash block), each a run the README promises.
PROSE_COMMANDS = (
    "python run.py mode=evaluate records_from=<run dir> selection.bootstrap=5000",
    "RESCUE_RUN=outputs/runs/demo/<time> jupyter execute --output=multi_n_run "
    "analysis/multi_n.ipynb",
)

SETUP = (
    "pip install -e . && python run.py",
    'pip install -e ".[dev]" && python -m pytest',
)
TEST_COMMAND = SETUP[1]
VLLM_TIER = ".venv-vllm/bin/python -m pytest -m vllm tests/vllm --timeout 3000"


@dataclass(frozen=True)
class Coverage:
    """The tests (pytest node ids) that run a README command, or check it.

    `cannot_run_here` is None when the tests run the command as written (shrunk as the module
    docstring says); otherwise it says what the command needs that a CI machine lacks."""

    tests: tuple[str, ...]
    cannot_run_here: str | None = None


HERE = "tests/test_readme_commands.py"
SWEEP_STUDY = f"{HERE}::test_the_study_commands_run_as_written"
WANDB = "tests/test_wandb_report.py"
LAUNCH = "tests/servers/test_launch_layouts.py"
SHARDS = "tests/modes/test_sharded_run.py"
CPU_LAYOUT = ("tests/vllm/test_cpu_layout.py::"
              "test_launcher_serves_the_cpu_layout_and_run_py_infers_with_it")
NO_CLUSTER = ("experiment=refcoco_multi_n needs RefCOCO on disk and the served Qwen3-VL and "
              "SAM3 models; the tests run the same launcher, shard and merge syntax on "
              "experiment=demo and compose the launcher preset")
VLLM_CI = ("several GB of downloads and minutes of install: CI builds it (.ci/run) and runs "
           "the real-vLLM tier with it")
NO_WEIGHTS = ("needs the two Qwen3-VL-2B models (~4.3 GB each from the hub); the real-vLLM "
              "tier runs these commands on its tiny random models under the 2B served names "
              "(tests/vllm/test_cpu_layout.py)")

REGISTRY: dict[str, Coverage] = {
    # -- set up and run
    SETUP[0]: Coverage(("tests/test_demo_digest.py::"
                        "test_the_demo_writes_the_stored_records_and_metrics",
                        "tests/test_demo_run.py::test_demo_end_to_end_then_offline_rerun",
                        f"{HERE}::test_the_setup_commands_are_the_two_documented_ones")),
    SETUP[1]: Coverage((f"{HERE}::test_ci_runs_the_readme_test_command_verbatim",
                        f"{HERE}::test_the_setup_commands_are_the_two_documented_ones"),
                       "it is the whole suite (and a pip install): CI's .ci/run runs it, "
                       "and the test checks .ci/run holds it verbatim"),
    # -- studies
    "python run.py -m verifier.noise=0.1,0.3,0.6 logger.group=noise": Coverage((SWEEP_STUDY,)),
    "python -m analysis.compare outputs/multiruns/demo/<time>": Coverage((SWEEP_STUDY,)),
    "python -m analysis.rescore outputs/runs/demo/<time> --selector-weights "
    "verifier=1,consensus=0.5": Coverage((
        SWEEP_STUDY, "tests/test_analysis.py::test_rescore_cli_writes_next_to_the_run")),
    PROSE_COMMANDS[0]: Coverage(("tests/test_demo_run.py::"
                                 "test_demo_end_to_end_then_offline_rerun",)),
    PROSE_COMMANDS[1]: Coverage(("tests/test_analysis.py::"
                                 "test_notebook_runs_as_its_first_cell_says",
                                 f"{HERE}::test_the_readme_names_the_notebooks_own_command")),
    # -- W&B
    "python run.py -m verifier.noise=0.1,0.5 planner.p_correct=0.4,0.6": Coverage((
        f"{WANDB}::test_every_run_of_a_sweep_is_logged_for_comparison",)),
    "python -m analysis.wandb_report outputs/multiruns/demo/<time> --dry-run": Coverage((
        f"{WANDB}::test_dry_run_builds_a_report_of_the_group_without_any_network",)),
    "wandb sync outputs/multiruns/demo/<time>/*/wandb/offline-run-*": Coverage(
        (SWEEP_STUDY,
         f"{WANDB}::test_dry_run_builds_a_report_of_the_group_without_any_network"),
        "uploads to wandb.ai: needs an account and the network; the tests expand its glob "
        "over a real sweep (one offline run per job) and check the dry run prints it"),
    "WANDB_MODE=online python -m analysis.wandb_report outputs/multiruns/demo/<time> "
    "--entity <you>": Coverage(
        (f"{WANDB}::test_dry_run_builds_a_report_of_the_group_without_any_network",
         f"{WANDB}::test_a_group_name_offline_gives_a_spec_from_the_conventions"),
        "saves a report to wandb.ai: needs an account and the network; the dry run builds "
        "the same report and prints this command"),
    # -- single-image inference on a laptop
    "bash tests/vllm/setup_venv.sh .venv-vllm && source .venv-vllm/bin/activate": Coverage(
        (f"{HERE}::test_ci_runs_the_readme_test_command_verbatim",), VLLM_CI),
    "python -m servers.download_models layout=cpu_qwen3vl_2b": Coverage(
        (f"{LAUNCH}::test_download_plan_and_dry_run",
         f"{LAUNCH}::test_download_without_a_hub_fails_clearly"),
        "downloads ~8.6 GB of weights from the Hugging Face hub; the tests check the plan "
        "for this layout and the one-line error without a hub"),
    "python -m servers.launch layout=cpu_qwen3vl_2b action=start": Coverage(
        (CPU_LAYOUT, f"{LAUNCH}::test_golden_commands[cpu_qwen3vl_2b]",
         f"{LAUNCH}::test_start_status_stop_a_real_sam_server",
         f"{LAUNCH}::test_vllm_readiness_checks_the_served_model"),
        f"{NO_WEIGHTS}; the tests check this layout's exact commands, start and stop its SAM "
        "server for real, and wait for a fake vLLM's served model"),
    'python run.py experiment=infer_cpu image=example.jpg query="the red car in the '
    'background"': Coverage(
        (CPU_LAYOUT, f"{LAUNCH}::test_the_cpu_experiment_talks_to_the_cpu_layout",
         "tests/modes/test_infer.py::test_the_cli_refuses_a_huge_image_in_one_line"),
        f"{NO_WEIGHTS} (and the user's example.jpg); the tests check that the experiment "
        "reaches what the layout serves and run experiment=infer's command line"),
    "python -m servers.launch layout=cpu_qwen3vl_2b action=stop": Coverage(
        (CPU_LAYOUT, f"{LAUNCH}::test_start_status_stop_a_real_sam_server",
         f"{LAUNCH}::test_sigterm_ignored_gets_sigkill"),
        f"stops what action=start started, which {NO_WEIGHTS}; the tests stop a real SAM "
        "server of the cpu layout, and one that ignores SIGTERM"),
    # -- running on a cluster
    "python run.py -m experiment=refcoco_multi_n hydra/launcher=slurm "
    "hydra.launcher.partition=<partition> subset.num_shards=8 'subset.shard=range(8)'": Coverage(
        ("tests/datasets/test_dataset_configs.py::test_launcher_presets[slurm-SlurmLauncher-"
         "fields0]",
         f"{SHARDS}::test_sharded_run_and_merge_equal_the_unsharded_run[local-2]"),
        f"needs a SLURM cluster; {NO_CLUSTER}"),
    "python run.py -m experiment=refcoco_multi_n hydra/launcher=local subset.num_shards=2 "
    "'subset.shard=range(2)'": Coverage(
        (f"{SHARDS}::test_sharded_run_and_merge_equal_the_unsharded_run[local-2]",),
        NO_CLUSTER),
    "python run.py -m experiment=refcoco_multi_n hydra/launcher=joblib_shards "
    "subset.num_shards=3 'subset.shard=range(3)'": Coverage(
        (f"{SHARDS}::test_sharded_run_and_merge_equal_the_unsharded_run[joblib_shards-3]",),
        NO_CLUSTER),
    "python run.py mode=merge records_from=<the multirun directory>": Coverage(
        (f"{SHARDS}::test_sharded_run_and_merge_equal_the_unsharded_run[joblib_shards-3]",
         f"{SHARDS}::test_sharded_run_and_merge_equal_the_unsharded_run[local-2]")),
    # -- tests
    "bash tests/vllm/setup_venv.sh": Coverage(
        (f"{HERE}::test_ci_runs_the_readme_test_command_verbatim",), VLLM_CI),
    VLLM_TIER: Coverage(
        (f"{HERE}::test_ci_runs_the_readme_test_command_verbatim",
         "tests/vllm/test_real_vllm.py::"
         "test_run_py_with_real_vllm_planner_and_thinking_verifier"),
        f"the real-vLLM tier: {VLLM_CI}"),
}


def _all_commands() -> list[str]:
    text = README.read_text()
    missing = [c for c in PROSE_COMMANDS if f"`{c}`" not in text]
    assert not missing, f"README no longer names {missing}: update PROSE_COMMANDS"
    return [*readme_commands(text), *PROSE_COMMANDS]


def test_the_parser_joins_continuations_and_cuts_comments() -> None:
    text = ("```bash\n# a comment line\npython a.py x=1 \\\n  'y=#2'   # why\n```\n"
            "```\nnot bash\n```\n```bash\nb --c\n```\n")
    assert readme_commands(text) == ["python a.py x=1 'y=#2'", "b --c"]


def test_every_readme_command_has_an_entry() -> None:
    commands = _all_commands()
    assert len(commands) == len(set(commands))
    assert sorted(set(commands) - set(REGISTRY)) == [], "README commands without a test"
    assert sorted(set(REGISTRY) - set(commands)) == [], "entries for commands not in README"


def test_a_command_not_run_here_says_why() -> None:
    for command, coverage in REGISTRY.items():
        assert coverage.tests, command
        why = coverage.cannot_run_here
        assert why is None or len(why.strip()) > 20, command


def _defined(path: Path) -> set[str]:
    """`name` and `Class::name` of the test functions the file defines."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body
                      if isinstance(f, ast.FunctionDef)}
    return names


def test_every_registered_test_exists() -> None:
    """Read from the files' syntax trees (no import, no collection): the function is defined,
    and each part of a parametrised id is written in its file."""
    for coverage in REGISTRY.values():
        for node in coverage.tests:
            file, _, name = node.partition("::")
            path = ROOT / file
            assert path.is_file(), node
            base, _, params = name.partition("[")
            assert base in _defined(path), node
            source = path.read_text()
            for part in filter(None, re.split(r"[-\]]", params)):
                assert re.sub(r"\d+$", "", part) in source, node


def test_the_setup_commands_are_the_two_documented_ones() -> None:
    text = README.read_text()
    section = text.split("## Set up and run (two commands)", 1)[1].split("\n## ", 1)[0]
    assert tuple(readme_commands(section)) == SETUP


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci
    assert any(ln.startswith(VLLM_TIER) for ln in ci)  # the vLLM tier, as the README runs it
    assert any("bash tests/vllm/setup_venv.sh .venv-vllm" in ln for ln in ci)


def test_the_readme_names_the_notebooks_own_command() -> None:
    cells = json.loads((ROOT / "analysis" / "multi_n.ipynb").read_text())["cells"]
    first = "".join(cells[0]["source"])
    assert PROSE_COMMANDS[1] in [ln.strip() for ln in first.splitlines()]


def _argv(command: str, fill: dict[str, str]) -> list[str]:
    for placeholder, value in fill.items():
        command = command.replace(placeholder, value)
    return shlex.split(command)


@pytest.mark.slow
def test_the_study_commands_run_as_written(tmp_path: Path) -> None:
    """README "Studies": the sweep, analysis.compare on it, analysis.rescore on one of its runs
    and the glob that `wandb sync` is given, as written; the sweep writes into tmp and runs 4
    samples with max_n=4 (the same study, smaller)."""
    sweep, compare, rescore = readme_commands(
        README.read_text().split("## Studies", 1)[1].split("\n## ", 1)[0])
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "wandb"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), HYDRA_FULL_ERROR="1")
    shrink = ["dataset.num_samples=4", "max_n=4", "selection.bootstrap=50",
              "report.overlays=0", "pipeline.progress=false", f"hydra.sweep.dir={out}",
              f"paths.cache_dir={tmp_path / 'cache'}"]

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    run([*_argv(sweep, {}), *shrink])
    jobs = sorted(p for p in out.iterdir() if p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2"]
    for job, noise in zip(jobs, ("0.1", "0.3", "0.6"), strict=True):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        assert f"verifier.noise={noise}" in overrides and "logger.group=noise" in overrides
        assert (job / "metrics.csv").is_file()

    run(_argv(compare, {"outputs/multiruns/demo/<time>": str(out)}))
    for name in ("study.md", "study_iou_vs_n.png"):  # what the README says it writes
        assert (out / name).is_file(), name
    assert all(f"`verifier.noise={n}`" in (out / "study.md").read_text()
               for n in ("0.1", "0.3", "0.6"))

    run(_argv(rescore, {"outputs/runs/demo/<time>": str(jobs[0])}))
    assert (jobs[0] / "metrics_rescore_verifier-1_consensus-0.5.csv").is_file()

    (sync,) = [c for c in _all_commands() if c.startswith("wandb sync ")]
    pattern = sync.split()[2].replace("outputs/multiruns/demo/<time>", str(out))
    found = sorted(Path(p).parent.parent.name for p in glob.glob(pattern))
    assert found == ["0", "1", "2"]  # one offline run per job, nothing else
