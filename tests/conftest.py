"""Test-wide settings: never touch the network, keep caches inside the test's temp dir."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("FLUXIMP_PROGRESS", "0")

from stages.core import compat  # noqa: E402

compat.ensure_torchvision()


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _quant_cache(tmp_path_factory):
    """The quantize-once and prompt-embedding caches (stages.models.quant_cache) live in the
    session's temp dir, never in the user's ~/.cache."""
    os.environ["FLUXIMP_QUANT_CACHE"] = str(tmp_path_factory.mktemp("quant-cache"))
    yield
