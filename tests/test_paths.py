"""stages/core/paths.py and dvc.yaml declare the same files: the one source of every path agrees
with what DVC tracks, stage by stage."""
from pathlib import Path

import pytest
import yaml

from stages.core import paths

ROOT = Path(__file__).resolve().parents[1]
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def declared(stage: dict, kinds) -> set[Path]:
    found = set()
    for kind in kinds:
        for item in stage.get(kind, []):
            path = next(iter(item)) if isinstance(item, dict) else item
            if not path.startswith(("stages/", "${")):  # code (tests/test_dvc_deps.py) and params-named files
                found.add(Path(path))
    return found


def related(a: Path, b: Path) -> bool:
    """The same path, or one inside the other (a folder in one place, its files in the other)."""
    return a == b or a in b.parents or b in a.parents


def test_every_dvc_stage_has_its_paths():
    assert sorted(DVC_STAGES) == sorted(paths.STAGES)


@pytest.mark.parametrize("name", sorted(paths.STAGES))
def test_paths_module_and_dvc_yaml_agree(name):
    p = paths.STAGES[name]()
    stage = DVC_STAGES[name]
    for role, kinds in (("in", ["deps"]), ("out", ["outs", "metrics", "plots"])):
        ours, dvcs = set(p.role(role).values()), declared(stage, kinds)
        lost = [str(d) for d in dvcs if not any(related(d, o) for o in ours)]
        extra = [str(o) for o in ours if not any(related(o, d) for d in dvcs)]
        assert not lost, f"{name}: dvc.yaml {role} {lost} are not in stages/core/paths.py"
        assert not extra, f"{name}: stages/core/paths.py {role} {extra} are not in dvc.yaml"
    tracked = declared(stage, ["deps", "outs", "metrics", "plots"])
    for key, path in p.role("local").items():  # local state must stay out of DVC's hands
        assert not any(path == d or d in path.parents for d in tracked), (name, key, path)


def test_under_moves_every_path():
    moved = paths.Filter().under("/tmp/x")
    assert moved.table == Path("/tmp/x/data/interim/filter.parquet")
    assert all(str(v).startswith("/tmp/x/") for r in ("in", "out") for v in moved.role(r).values())
