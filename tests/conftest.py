"""Test-wide settings: never touch the network, keep caches inside the test's temp dir."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("FLUXIMP_PROGRESS", "0")

import stages  # noqa: E402,F401  (torchvision on CPU torch: stages/core/compat.py)

import pytest  # noqa: E402

from tests import samplekit  # noqa: E402
from tests.stagerun import run_stage  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _quant_cache(tmp_path_factory):
    """The quantize-once and prompt-embedding caches (stages.models.quant_cache) and the stage
    cache (base images, held-out measurements: stages.core.stagecache) live in the session's temp
    dir, never in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXIMP_QUANT_CACHE", str(tmp_path_factory.mktemp("quant-cache")))
        mp.setenv("FLUXIMP_STAGE_CACHE", str(tmp_path_factory.mktemp("stage-cache")))
        yield


# ----------------------------------------------------------------------------- train / resume tests
import shutil  # noqa: E402


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tmp work dir with data/cache encoded once per test module (copied into each test's dir)."""
    import torch

    from tests import trainkit

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("encoded")
    trainkit.make_curated(root, n=12, sizes=((32, 32),))
    p = trainkit.write_params(root, **trainkit.FAST)
    with trainkit.tiny_cache(tmp_path_factory.getbasetemp() / "tiny-cache"):
        from stages import encode
        from stages.core.paths import Encode

        encode.run(p, Encode().under(root))
        yield root


@pytest.fixture
def workdir(encoded, tmp_path, monkeypatch):
    """A fresh project folder holding the encoded cache, MLflow off (tracking has its own tests)."""
    shutil.copytree(encoded / "data/cache", tmp_path / "data/cache")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUXIMP_MLFLOW", "0")
    return tmp_path


@pytest.fixture(scope="session")
def sampled(tmp_path_factory):
    """A project after one run of the sample stage (tests/samplekit.py): used by the sample and
    evaluate tests."""
    from stages import sample

    root = samplekit.build_project(tmp_path_factory.mktemp("evalproj"))
    run_stage(sample.main, root)
    return root
