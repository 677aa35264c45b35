"""Run a stage's main() inside a project folder, as `python -m stages.<name>` would from there."""
import os
from pathlib import Path


def run_stage(main, root: Path) -> None:
    """cd into ``root``, run ``main()`` with MLflow off, then restore the cwd and the environment."""
    old, old_env = Path.cwd(), os.environ.get("FLUXIMP_MLFLOW")
    os.environ["FLUXIMP_MLFLOW"] = "0"
    os.chdir(root)
    try:
        main()
    finally:
        os.chdir(old)
        if old_env is None:
            os.environ.pop("FLUXIMP_MLFLOW", None)
        else:
            os.environ["FLUXIMP_MLFLOW"] = old_env
