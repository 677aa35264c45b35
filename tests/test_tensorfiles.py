"""safetensors outputs have the same bytes on every save (their DVC hash depends on content only)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.core import tensorfiles
from stages.core.params import ROOT

SAVE_TWICE = """
import sys, torch
from stages.core import tensorfiles
tensors = {"b": torch.arange(6.).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
tensorfiles.save(tensors, sys.argv[1], {"meta": '{"ids": ["x", "y"], "model": "tiny"}'})
"""


def test_same_content_same_bytes_in_separate_processes(tmp_path):
    # safetensors' random metadata order differs per process, so each save is its own interpreter
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", SAVE_TWICE, str(path)], cwd=ROOT, check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    assert tensorfiles.metadata(paths[0]) == {"meta": '{"ids": ["x", "y"], "model": "tiny"}'}


def test_more_than_one_metadata_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="one key"):
        tensorfiles.save({"x": torch.zeros(1)}, tmp_path / "x.safetensors", {"a": "1", "b": "2"})
    assert not (tmp_path / "x.safetensors").exists()


def test_numpy_arrays_are_saved_as_numpy(tmp_path):
    path = tensorfiles.save({"e": np.eye(2, dtype=np.float32)}, tmp_path / "e.safetensors")
    assert torch.equal(load_file(path)["e"], torch.eye(2))


def test_keep_one_key_drops_the_others_and_keeps_the_tensors(tmp_path):
    path = tmp_path / "lib.safetensors"
    tensors = {"w": torch.randn(3, 2)}
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps({"r": 4})})
    tensorfiles.keep_one_key(path, "lora_adapter_metadata")
    assert tensorfiles.metadata(path) == {"lora_adapter_metadata": '{"r": 4}'}
    assert torch.equal(load_file(path)["w"], tensors["w"])
