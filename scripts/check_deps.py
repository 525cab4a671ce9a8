"""Is every dependency of pyproject.toml (with the test extra) installed, at a version its range accepts?

    python scripts/check_deps.py [--pyproject pyproject.toml] [--wheelhouse wheelhouse]

Exit 0 and one line when all are; else exit 1, naming each missing or out-of-range package and the command that
installs them from a wheelhouse (made by scripts/wheelhouse.sh) without replacing what is there, torch included.
scripts/gpu_check.sh runs it first.
"""
import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest brings there
    import tomli as tomllib

NOT_IN_WHEELHOUSE = ("torch", "torchvision")  # built for the machine's CUDA; scripts/wheelhouse.sh leaves them out


def requirements(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    """The [project] dependencies and the named optional ones, those whose markers hold here."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def problems(reqs: list[Requirement]) -> list[str]:
    """'name (missing)' or 'name X.Y (needs SPEC)' for each requirement the environment does not meet."""
    out = []
    for req in reqs:
        try:
            have = version(req.name)
        except PackageNotFoundError:
            out.append(f"{req.name} (missing)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name} {have} (needs {req.specifier})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("--wheelhouse", default="wheelhouse", help="named in the fix command")
    args = parser.parse_args()
    reqs = requirements(args.pyproject)
    bad = problems(reqs)
    if not bad:
        print(f"dependencies: all {len(reqs)} of {args.pyproject.name} present "
              f"(torch {version('torch')}, python {sys.version.split()[0]})")
        return 0
    print(f"dependencies: {len(bad)} of {len(reqs)} not met in {sys.executable}: {', '.join(bad)}\n"
          f"  fix, from the repository root (keeps every installed package, torch included):\n"
          f"    {sys.executable} -m pip install --no-index --find-links {args.wheelhouse} -e '.[test]'\n"
          f"  where {args.wheelhouse}/ was made on a machine with package access by\n"
          f"    bash scripts/wheelhouse.sh --python {sys.version_info.major}.{sys.version_info.minor} "
          f"--missing-only <this machine's `pip list --format=freeze`>", file=sys.stderr)
    if any(b.split()[0] in NOT_IN_WHEELHOUSE for b in bad):
        print(f"  {' and '.join(NOT_IN_WHEELHOUSE)} are the machine's own (no wheelhouse carries them): install a "
              f"pair that meets the ranges above with the machine's CUDA build", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
