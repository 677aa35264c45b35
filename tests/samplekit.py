"""A scratch project for the sample and evaluate stages: two prompts and a small random LoRA
(built with peft, saved with FluxPipeline.save_lora_weights). The ``sampled`` fixture
(tests/conftest.py) runs the sample stage in it once per session."""
from pathlib import Path

from tests.stagerun import write_params

PROMPTS = ["a harbour at dawn with fishing boats", "a bowl of pears on a table"]


def make_adapter(p, out: Path, rank: int = 4) -> None:
    """A rank-``rank`` LoRA on the attention projections with random (non-zero) B matrices."""
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from stages.models import flux

    transformer = flux.load_transformer(p.model)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    for name, prm in transformer.named_parameters():
        if "lora_B" in name:
            prm.data = torch.randn(prm.shape, generator=gen) * 0.5
    FluxPipeline.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(transformer))


def build_project(root: Path) -> Path:
    """A scratch project: params.yaml (smoke, 2 prompts x 2 seeds x 3 scales, 2 steps), the prompt
    file, and models/lora."""
    p = write_params(root, "sample.prompts=prompts.txt", "sample.seeds=[0,1]", "sample.steps=2",
                     "sample.lora_scales=[0.0,0.5,1.0]", "sample.batch_size=4", "data.holdout=0.2")
    (root / "prompts.txt").write_text("# test prompts\n\n" + "\n".join(PROMPTS) + "\n")
    make_adapter(p, root / "models" / "lora")
    return root


def count_renders(monkeypatch) -> dict:
    """Count what the transformer renders from now on: ``images`` (render.denoise's seeds) and
    ``forward`` (FluxTransformer2DModel.forward calls), to prove what came from a cache."""
    from diffusers import FluxTransformer2DModel

    from stages.models import render

    counts = {"images": 0, "forward": 0}
    denoise, forward = render.denoise, FluxTransformer2DModel.forward

    def counting_denoise(pipe, embeds, pooled, seeds, **kw):
        counts["images"] += len(seeds)
        return denoise(pipe, embeds, pooled, seeds, **kw)

    def counting_forward(self, *a, **kw):
        counts["forward"] += 1
        return forward(self, *a, **kw)

    monkeypatch.setattr(render, "denoise", counting_denoise)
    monkeypatch.setattr(FluxTransformer2DModel, "forward", counting_forward)
    return counts
