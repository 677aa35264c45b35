"""torch.compile of the transformer's blocks (stages/models/compiling.py) on the tiny model: on by default
on CUDA only, a compile failure falls back to eager with one log line, compiled training gives the
eager adapter within float tolerance, and a resume under compile continues at the right step."""
import shutil

import pytest
import torch
import torch._functorch.config
from safetensors.torch import load_file

from stages.models import compiling
from tests import trainkit


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", "cuda", True), ("auto", "cpu", False), (True, "cpu", True), (False, "cuda", False)])
def test_auto_compiles_on_cuda_only(setting, device, expected):
    assert compiling.enabled(setting, torch.device(device)) is expected


def test_compiled_graphs_are_cached_outside_the_repo_per_code_of_the_autograd_functions(monkeypatch, tmp_path):
    import os

    from stages.models import fp8

    for var in ("FLUXIMP_COMPILE_CACHE", "FLUXIMP_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions", False)
    monkeypatch.setenv("FLUXIMP_CACHE", str(tmp_path))
    root = compiling.configure_cache()
    assert root == tmp_path / "compiled"
    key = compiling.code_key()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled" / "inductor" / key)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "compiled" / "triton")
    assert torch._functorch.config.autograd_cache_allow_custom_autograd_functions  # our folder: keyed by the code
    changed = tmp_path / "fp8.py"
    changed.write_bytes(open(fp8.__file__, "rb").read() + b"\n# another backward\n")
    monkeypatch.setattr(fp8, "__file__", str(changed))
    assert compiling.code_key() != key
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers leaves there
    compiling.configure_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled" / "inductor" / compiling.code_key())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))  # the user's own folder: torch's rules
    compiling.configure_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "theirs")
    assert not torch._functorch.config.autograd_cache_allow_custom_autograd_functions


AOT_CHILD = """
import sys, torch
from torch._dynamo.utils import counters
import diffusers.models  # (as the stages do: it sets torch's default cache folder)
from stages.models import compiling, fp8
compiling.configure_cache()
torch.manual_seed(0)
layer = fp8.Fp8Linear.from_linear(torch.nn.Linear(32, 32), torch.float32)
layer.kernels = True  # the autograd Function's path (the kernel emulated on the CPU)
lora = torch.nn.Linear(32, 32)
block = torch.compile(lambda x: torch.nn.functional.gelu(layer(x)) + lora(x))
block(torch.randn(16, 32)).sum().backward()
print(dict(counters["aot_autograd"]))
"""


def test_a_second_process_reads_the_fp8_blocks_graphs_from_aotautograds_cache(tmp_path):
    """The fp8 product is a custom autograd Function, which AOTAutograd's cache skips unless allowed
    (configure_cache allows it in our keyed folder): a second run then traces no joint graph."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "FLUXIMP_CACHE": str(tmp_path), "PYTHONPATH": os.getcwd()}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = [json.loads(subprocess.run([sys.executable, "-c", AOT_CHILD], env=env, capture_output=True, text=True,
                                      check=True, timeout=600).stdout.strip().splitlines()[-1].replace("'", '"'))
            for _ in range(2)]
    assert runs[0].get("autograd_cache_miss") == 1 and "autograd_cache_bypass" not in runs[0]
    assert runs[1].get("autograd_cache_hit") == 1


def adapter(workdir):
    return load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")


def test_a_failing_compiler_falls_back_to_eager_with_one_line(workdir, monkeypatch, capfd):
    calls = []

    def broken_backend(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler here")

    real = compiling.compile_blocks
    monkeypatch.setattr(compiling, "compile_blocks", lambda t, backend="inductor": real(t, backend=broken_backend))
    log = trainkit.run_train(workdir, train__compile=True, train__steps=3, train__checkpoint_every=3)
    assert calls, "the compiled blocks were never called"
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if "torch.compile failed" in ln]
    assert len(warnings) == 1 and "running eager" in warnings[0]
    compiled = adapter(workdir)
    eager_dir = workdir / "eager"
    eager_dir.mkdir()
    import shutil

    shutil.copytree(workdir / "data", eager_dir / "data")
    monkeypatch.chdir(eager_dir)
    eager_log = trainkit.run_train(eager_dir, train__compile=False, train__steps=3, train__checkpoint_every=3)
    assert [r["loss"] for r in log] == [r["loss"] for r in eager_log]  # the fallback redid step 1 exactly
    assert all(torch.equal(compiled[k], v) for k, v in adapter(eager_dir).items())


@pytest.mark.slow
def test_compiled_training_gives_the_eager_adapter_and_resumes(workdir, monkeypatch, tmp_path):
    """inductor on the CPU (a C++ compiler builds the kernels): same adapter within float tolerance; a
    run stopped after its checkpoint resumes at that step under compile."""
    import shutil

    monkeypatch.setenv("FLUXIMP_COMPILE_CACHE", str(tmp_path / "compile-cache"))
    steps = dict(train__steps=6, train__checkpoint_every=3)
    trainkit.run_train(workdir, train__compile=False, **steps)
    eager = adapter(workdir)

    compiled_dir = tmp_path / "compiled"
    shutil.copytree(workdir / "data", compiled_dir / "data")
    monkeypatch.chdir(compiled_dir)
    executed = []
    trainkit.run_train(compiled_dir, callbacks=[lambda m, s: executed.append(s)], train__compile=True,
                       train__steps=3, train__checkpoint_every=3)
    assert executed == [1, 2, 3]
    executed.clear()  # the same run, longer: continues from the step-3 checkpoint (constant lr)
    trainkit.run_train(compiled_dir, callbacks=[lambda m, s: executed.append(s)], train__compile=True, **steps)
    assert executed[-3:] == [4, 5, 6] and 1 not in [s for s in executed if s > 0][-3:]
    compiled = adapter(compiled_dir)
    assert compiled.keys() == eager.keys()
    for k, v in eager.items():
        assert torch.allclose(compiled[k], v, rtol=1e-3, atol=1e-5), k


def test_compiled_training_traces_one_graph_per_block_kind(workdir, monkeypatch):
    """dynamo guards on requires_grad and strides: the first double block's inputs (from frozen
    embedders) and the first single block's (whole tensors, not the slices the single blocks pass
    on) would each get a graph of their own — double the compile time of the first step. (With
    gradient checkpointing, as every card plan trains; without it the single blocks get two graphs.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real = compiling.compile_blocks
    monkeypatch.setattr(compiling, "compile_blocks", lambda t, backend="inductor": real(t, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    trainkit.run_train(workdir, train__compile=True, train__steps=2, train__checkpoint_every=2,
                       train__gradient_checkpointing=True)
    assert counters["stats"]["unique_graphs"] == 2  # one double block, one single block
    assert counters["frames"]["ok"] == 2


def test_cuda_graph_benchmarks_mark_every_training_step(workdir, monkeypatch):
    """``FLUXIMP_COMPILE_MODE=reduce-overhead`` (a benchmark of CUDA graphs): each step tells torch's graph
    trees that a new step begins, so they may reuse the last step's buffers; no mark without that mode."""
    import torch

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    real = compiling.compile_blocks
    monkeypatch.setattr(compiling, "compile_blocks", lambda t, backend="inductor": real(t, backend="eager"))
    monkeypatch.setenv("FLUXIMP_COMPILE_MODE", "reduce-overhead")
    trainkit.run_train(workdir, train__compile=True, train__steps=3, train__checkpoint_every=3)
    assert len(marks) == 3
    monkeypatch.delenv("FLUXIMP_COMPILE_MODE")
    shutil.rmtree(workdir / "models")
    trainkit.run_train(workdir, train__compile=True, train__steps=2, train__checkpoint_every=2)
    assert len(marks) == 3


@pytest.mark.parametrize("shape,index", [((1, 10, 4), (slice(None), slice(3, None))), ((2, 10, 4), (slice(None), slice(3, None)))])
def test_block_inputs_get_one_layout_with_the_same_values(shape, index):
    whole = torch.randn(*shape, requires_grad=True)
    part = whole[index]
    same = compiling.same_layout(part)
    assert same.stride() == torch.empty(same.shape).stride() and torch.equal(same, part)
    if shape[0] == 1:
        assert same.data_ptr() == part.data_ptr()  # batch 1: a view, no copy
    same.sum().backward()
    assert torch.equal(whole.grad[index], torch.ones_like(part)) and whole.grad.sum() == part.numel()
    contiguous = torch.randn(2, 3, 4)
    assert compiling.same_layout(contiguous) is contiguous


def test_lora_scales_and_hot_swapped_adapters_reuse_the_compiled_blocks(tmp_path):
    """The sample stage renders several LoRA scales and the operating-point grid several snapshots: with
    the scale set in place (render.set_lora_scale) and the next adapter hot-swapped into the same layers,
    the compiled blocks are built once, and every latent equals diffusers' eager set_adapters/load path."""
    import torch._dynamo
    from safetensors.torch import load_file, save_file
    from torch._dynamo.testing import CompileCounter

    from stages.models import flux, memory, render
    from tests.samplekit import make_adapter
    from tests.stagerun import write_params

    p = write_params(tmp_path, "sample.steps=2")
    make_adapter(p, tmp_path / "a")
    weights = load_file(tmp_path / "a/pytorch_lora_weights.safetensors")  # another snapshot: other B matrices
    (tmp_path / "b").mkdir()
    save_file({k: -0.5 * v if "lora_B" in k else v for k, v in weights.items()},
              tmp_path / "b/pytorch_lora_weights.safetensors")
    embeds, pooled = render.embed_prompts(p.model, ["a harbour at dawn"], 32, memory.UNCONSTRAINED, device="cpu")
    lora_file = "pytorch_lora_weights.safetensors"

    def denoise(pipe):
        return render.denoise(pipe, embeds, pooled, [0], steps=2, guidance=3.5, height=64, width=64)[0]

    eager = render.transformer_pipeline(p.model, flux.load_transformer(p.model, device="cpu"))
    expected = []
    for folder, scales in (("a", (1.0, 0.5, 0.75)), ("b", (0.75,))):
        eager.load_lora_weights(str(tmp_path / folder), weight_name=lora_file, adapter_name=folder)
        for scale in scales:
            eager.set_adapters([folder], [scale])
            expected.append(denoise(eager))
        eager.delete_adapters([folder])

    torch._dynamo.reset()
    counter = CompileCounter()
    pipe = render.transformer_pipeline(p.model, flux.load_transformer(p.model, device="cpu"))
    pipe.load_lora_weights(str(tmp_path / "a"), weight_name=lora_file, adapter_name="grid")
    compiling.compile_blocks(pipe.transformer, backend=counter)
    got = []
    for scale in (1.0, 0.5, 0.75):
        render.set_lora_scale(pipe.transformer, "grid", scale)
        got.append(denoise(pipe))
        if scale == 1.0:
            built = counter.frame_count
    pipe.load_lora_weights(str(tmp_path / "b"), weight_name=lora_file, adapter_name="grid", hotswap=True)
    render.set_lora_scale(pipe.transformer, "grid", 0.75)  # a swap resets the scale to the adapter's own
    got.append(denoise(pipe))
    assert built > 0 and counter.frame_count == built  # no block compiled again
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[2], got[3])  # the scale and the swap took
