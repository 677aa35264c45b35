"""notebooks/colab.ipynb: its Colab overrides compose into valid params, and the whole notebook
runs offline with nbclient on the smoke profile (network cells skipped by OFFLINE_TEST)."""
import json
import subprocess
from pathlib import Path

import nbformat
import pytest

from stages.core import params

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


def notebook_params() -> dict:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    ns: dict = {}
    exec(parameters_cell(nb).source, ns)
    return ns


def test_notebook_is_valid_and_network_cells_obey_the_flag():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"
    for cell in nb.cells:
        src = cell.source
        if cell.cell_type == "code" and any(w in src for w in ("git clone", "pip install", "login(")):
            assert "if OFFLINE_TEST" in src or "if not OFFLINE_TEST" in src, src[:200]


def test_colab_overrides_compose_into_a_colab_sized_flux_dev_run():
    ns = notebook_params()
    assert ns["OFFLINE_TEST"] is False  # what a Colab user runs
    p = params.validate(params.compose([f"profile={ns['PROFILE']}", *ns["COLAB_OVERRIDES"]]))
    full = params.validate(params.compose([f"profile={ns['PROFILE']}"]))
    assert p.profile == "flux-dev" and p.model.base == "black-forest-labs/FLUX.1-dev"
    assert p.model.quantization == "nf4"
    # every stage fits an 8 GiB card at 1024² (reports/bench/real_path.md): the card's class decides the rest
    assert p.train.resolution == 1024 and p.model.vram_gb == "auto" and 512 <= p.sample.resolution <= 1024
    assert p.train.steps < full.train.steps and p.sample.steps < full.sample.steps
    assert p.train.gradient_checkpointing and p.train.batch_size == 1


@pytest.mark.slow
@pytest.mark.e2e
def test_notebook_runs_offline_on_the_smoke_profile(tmp_path):
    from nbclient import NotebookClient

    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = parameters_cell(nb)
    cell.source += f"\nOFFLINE_TEST = True\nREPO_DIR = {str(repo)!r}\n"
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "OFFLINE_TEST: using the existing checkout" in text
    assert "dry run: would upload" in text, "the publish cell must run as a dry run offline"
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    index = json.loads((repo / "reports/samples/index.json").read_text())
    assert len(pngs) == len(index["grids"]) >= 1
    html = "".join(o.data.get("text/html", "") for o in outputs if o.output_type in ("display_data", "execute_result"))
    metrics = json.loads((repo / "reports/eval/metrics_all.json").read_text())
    assert "style_centroid" in html and f"{metrics['style_centroid_lora']:.4g}"[:4] in html
    # the model card the notebook's publish cell assembled from these real outputs
    from tests import pubkit

    assert pubkit.check_card_metrics(repo / "models/hub", metrics) >= 30
