"""Dependencies: one lock file that pins every package of the three environments (run, app, test),
direct pins that agree with it, and Makefile targets that install only what they need, once.
`pip check` itself runs after every install (Makefile) and in CI (.ci/run)."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = ["requirements.txt", "requirements-gradio.txt", "requirements-test.txt"]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if m := re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line):
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return out


def test_every_direct_pin_is_in_the_lock_at_the_same_version():
    lock = pins(REPO / "requirements.lock")
    for name in FILES:
        for pkg, version in pins(REPO / name).items():
            assert pkg in lock, f"{name}: {pkg} is not in requirements.lock (run make lock)"
            assert lock[pkg].split("+")[0] == version, f"{pkg}: {name} says {version}, the lock {lock[pkg]}"
    assert lock["torch"].startswith("2.13.0") and lock["pillow"].split(".")[0] == "12"  # gradio caps pillow<13
    for must in ("scipy", "huggingface-hub", "gradio"):
        assert must in pins(REPO / "requirements.txt") or must in pins(REPO / "requirements-gradio.txt")
    text = (REPO / "requirements.lock").read_text()
    assert "--extra-index-url" not in text and "--find-links" not in text  # no machine's index in it
    assert not re.search(r"^\S+\[.*\]==", text, re.M)  # pip takes no extras in a constraints file
    assert "--no-deps" not in (REPO / "Makefile").read_text()


def dry_run(target: str, venv: Path) -> str:
    return subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("target,needs", [("demo", "requirements-gradio.txt"), ("sweep", None),
                                          ("mlflow-ui", None), ("exps", None)])
def test_targets_install_only_what_they_need(tmp_path, target, needs):
    fresh = dry_run(target, tmp_path / "venv")
    assert fresh.count("python3 -m venv") == 1
    assert "requirements-test.txt" not in fresh  # no test stack for the app, sweeps or the UI
    assert (needs in fresh) if needs else ("requirements-gradio.txt" not in fresh)

    # with the environment installed (stamps newer than the requirement files): nothing is installed
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "bin" / "python").chmod(0o755)
    for stamp in (".installed", ".app-installed", ".test-installed"):
        (venv / stamp).write_text("")
    again = dry_run(target, venv)
    assert "pip install" not in again and "python3 -m venv" not in again


# ----------------------------------------------------------------------------- PyPI alone
# What a user's machine does: pip with PyPI as its only index (this machine's pip config, local wheel folder,
# extra indexes and torch cap ignored). `--dry-run --report` resolves without installing; `fast-deps` reads
# each wheel's METADATA with HTTP range requests, so no wheel is downloaded even where the index serves no
# PEP 658 metadata files (plain --dry-run downloads the wheels: ~3 GB for torch and its CUDA libraries).
PYPI_ONLY_UNSET = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_NO_INDEX")


def pypi_only_env() -> dict[str, str]:
    import os
    env = {k: v for k, v in os.environ.items() if k not in PYPI_ONLY_UNSET}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.fixture(scope="module")
def pypi():
    import sys
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], env=pypi_only_env(),
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("PyPI unreachable (pip index versions torch timed out after 60 s): no PyPI-only resolution")
    if r.returncode != 0 or "2.13.0" not in r.stdout:
        pytest.skip(f"PyPI unreachable or without torch 2.13.0 (pip index versions torch: "
                    f"{(r.stderr or r.stdout).strip()[-300:]}): no PyPI-only resolution")


def install_commands(target: str, venv: Path) -> list[list[str]]:
    """The `pip install` commands `make <target>` runs in a fresh venv (the pip upgrade left out)."""
    import shlex
    cmds = []
    for line in dry_run(target, venv).splitlines():
        words = shlex.split(line)
        if len(words) > 2 and words[0].endswith("/bin/pip") and words[1] == "install" and "--upgrade" not in words:
            cmds.append([w for w in words[2:] if w != "-q"])
    return cmds


@pytest.mark.pypi
@pytest.mark.slow
@pytest.mark.parametrize("target", ["install", "install-app", "install-test"])
def test_every_install_target_resolves_from_pypi_alone(pypi, tmp_path, target):
    import json
    import sys
    cmds = install_commands(target, tmp_path / "venv")
    assert cmds and cmds[0][-1] == "torch" and "requirements.lock" in cmds[0]  # torch first, at the lock's pin
    assert any(f"requirements{'-test' if target == 'install-test' else ''}.txt" in c for c in cmds[-1])
    lock = pins(REPO / "requirements.lock")
    for i, args in enumerate(cmds):
        report = tmp_path / f"report{i}.json"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                            "--use-feature=fast-deps", "--report", str(report), *args],
                           cwd=REPO, env=pypi_only_env(), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"make {target}: pip install {' '.join(args)} does not resolve from PyPI " \
                                  f"alone:\n{r.stderr[-3000:]}"
        got = {re.sub(r"[-_.]+", "-", x["metadata"]["name"]).lower(): x["metadata"]["version"]
               for x in json.loads(report.read_text())["install"]}
        assert got["torch"] == "2.13.0"  # PyPI's build of the lock's pin (no local label)
        assert all(got[k] == lock[k] for k in got if k in lock), {k: (got[k], lock[k]) for k in got
                                                                    if k in lock and got[k] != lock[k]}
        assert not [x for x in json.loads(report.read_text())["install"] if not x["is_direct"] and
                    x["download_info"]["url"].startswith("file:")]  # nothing from this machine's disk
