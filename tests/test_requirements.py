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
