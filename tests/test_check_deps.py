"""scripts/check_deps.py, the dependency check that opens gpu_check.sh: it names what is missing or out of range
and the command that installs it from a wheelhouse."""
import json
import subprocess
import sys


def check(repo, tmp_path, dependencies: list[str], test_extra: list[str]) -> subprocess.CompletedProcess:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\ndependencies = {json.dumps(dependencies)}\n'  # JSON arrays are TOML
                         f'[project.optional-dependencies]\ntest = {json.dumps(test_extra)}\n')
    return subprocess.run([sys.executable, str(repo / "scripts" / "check_deps.py"), "--pyproject", str(pyproject),
                           "--wheelhouse", "/nodes/wh"], capture_output=True, text=True, timeout=120)


def test_missing_and_out_of_range_packages_are_named_with_the_fix(repo, tmp_path):
    out = check(repo, tmp_path, ["torch>=999", "numpy>=1", "no-such-package-x>=1", 'colorama; sys_platform == "x"'],
                ["no-such-test-package-y"])
    assert out.returncode == 1
    assert "3 of 4 not met" in out.stderr  # colorama's marker is false here: not required
    assert "no-such-package-x (missing)" in out.stderr and "no-such-test-package-y (missing)" in out.stderr
    assert "needs >=999" in out.stderr and "numpy" not in out.stderr.split("fix")[0]
    assert "-m pip install --no-index --find-links /nodes/wh -e '.[test]'" in out.stderr
    assert "torch and torchvision are the machine's own" in out.stderr


def test_all_present_is_one_line_and_exit_0(repo, tmp_path):
    out = check(repo, tmp_path, ["torch>=2.6", "numpy"], ["pytest"])
    assert out.returncode == 0 and out.stdout.startswith("dependencies: all 3 of pyproject.toml present (torch ")
    assert out.stderr == ""
