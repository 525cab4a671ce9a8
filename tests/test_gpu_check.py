"""scripts/gpu_check.sh's plan: the steps it runs, in order, and their time limits, which must fit a GPU lent for
10 minutes (issue 25: under 8 minutes on one GPU, tests included; --quick under 3)."""
import os
import subprocess

KILL_GRACE = 3  # `timeout -k 3`: a step that ignores SIGTERM gets this long before SIGKILL


def plan(repo, *args: str, **env: str) -> dict[str, int]:
    out = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--plan", *args], capture_output=True,
                         text=True, timeout=60, env={**os.environ, **env}, check=True).stdout.splitlines()
    steps = {line.split()[0]: int(line.split()[1]) for line in out[:-1]}
    assert out[-1] == f"total {sum(steps.values())} s"
    return steps


def worst_case(steps: dict[str, int]) -> int:
    return sum(steps.values()) + KILL_GRACE * len(steps)


def test_one_gpu_check_fits_8_minutes_with_the_dependency_check_and_tests_first(repo):
    steps = plan(repo)
    assert list(steps) == ["deps", "tests", "train", "sample", "extract"]  # fsdp needs 2 GPUs
    assert worst_case(steps) <= 8 * 60


def test_quick_is_the_tests_and_one_sampling_benchmark_under_3_minutes(repo):
    steps = plan(repo, "--quick")
    assert list(steps) == ["deps", "tests", "sample_quick"]
    assert worst_case(steps) <= 3 * 60


def test_fsdp_runs_on_two_gpus_and_the_optional_zoo_step_fits_beside_quick(repo, tmp_path):
    assert list(plan(repo, "--gpus", "2"))[-1] == "fsdp"
    steps = plan(repo, "--quick", ZOO_CKPT_DIR=str(tmp_path))
    assert list(steps)[-1] == "zoo" and worst_case(steps) <= 10 * 60
