"""Gradio app (a Hugging Face Space as it is): FLUX.1-dev + the Impressionism LoRA, base vs LoRA.

Configuration, by flag or environment variable (a Space sets the variables in its settings):
  --base    / FLUXIMP_BASE     hub id or local diffusers folder (default black-forest-labs/FLUX.1-dev;
                               in the project checkout also ``tiny-random``, the smoke model)
  --adapter / FLUXIMP_ADAPTER  local folder holding pytorch_lora_weights.safetensors, or a hub repo id
  --trigger / FLUXIMP_TRIGGER  the trigger words (default: adapter.json's, else "impressionism style")
  --offload / FLUXIMP_OFFLOAD=1  enable_model_cpu_offload (GPUs with less than ~40 GB)
FLUX.1-dev is gated: the Space needs an HF_TOKEN secret with its licence accepted.

``python app/app.py --base tiny-random --adapter models/lora`` (``make demo``) runs it on the smoke
profile's outputs. LoRA scale 0 is the base model; "compare" renders base and LoRA from the same seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if (REPO / "stages" / "core" / "compat.py").exists():  # inside the project checkout (make demo, tests)
    sys.path.insert(0, str(REPO))
    from stages.core import compat

    compat.ensure_torchvision()  # CPU torch + PyPI torchvision (see stages/core/compat.py)

import gradio as gr  # noqa: E402
import torch  # noqa: E402

DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"
DEFAULT_TRIGGER = "impressionism style"
WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER = "impressionism"
# small outputs (the smoke model's 64 px) fill the frame instead of sitting in a corner
CSS = "#lora-image img, #base-image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
EXAMPLES = ["a harbour at dawn with fishing boats", "a woman with a parasol on a hill",
            "a city boulevard in the rain", "a bowl of pears on a table"]


def resolve_base(base: str) -> str:
    """``tiny-random`` -> the project's tiny model folder (built on first use); anything else as is."""
    if base == "tiny-random":
        from stages.core.params import Model
        from stages.models import flux

        return flux.resolve_base(Model(base=base))
    return base


def adapter_info(adapter: str | None) -> dict:
    """adapter.json from the local folder or the hub repo ({} if it has none)."""
    if not adapter:
        return {}
    local = Path(adapter).expanduser()
    if local.is_dir():
        f = local / "adapter.json"
        return json.loads(f.read_text()) if f.exists() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(adapter, "adapter.json")).read_text())
    except Exception:  # a repo without adapter.json (or offline): defaults are fine
        return {}


def with_trigger(prompt: str, trigger: str) -> str:
    """As the sample stage (and the training captions) put it: ``<prompt>, <trigger>``."""
    prompt = prompt.strip().rstrip(",.")
    if not trigger or trigger.lower() in prompt.lower():
        return prompt
    return f"{prompt}, {trigger}"


class Generator:
    """The pipeline with the adapter loaded once; renders at any LoRA scale (0 = base)."""

    def __init__(self, base: str, adapter: str | None, trigger: str | None = None,
                 device: str | None = None, offload: bool = False):
        from diffusers import FluxPipeline

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = FluxPipeline.from_pretrained(resolve_base(base), dtype=dtype)
        if offload and self.device.type == "cuda":
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        info = adapter_info(adapter)
        self.has_lora = bool(adapter)
        if self.has_lora:
            self.pipe.load_lora_weights(adapter, weight_name=WEIGHTS, adapter_name=ADAPTER)
        self.trigger = trigger or info.get("trigger") or DEFAULT_TRIGGER
        self.size = int(info.get("resolution") or 1024)
        self.label = f"{base} + {adapter}" if adapter else base
        self._lock = threading.Lock()

    def render(self, prompt: str, seed: int, steps: int, guidance: float, scale: float, size: int):
        with self._lock:  # one pipeline, adapter state is global: one request at a time
            if self.has_lora and scale > 0:
                self.pipe.enable_lora()
                self.pipe.set_adapters([ADAPTER], [float(scale)])
            elif self.has_lora:
                self.pipe.disable_lora()
            gen = torch.Generator("cpu").manual_seed(int(seed))
            return self.pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
                             height=int(size), width=int(size), generator=gen).images[0]

    def __call__(self, prompt, seed, steps, guidance, scale, add_trigger, compare, size):
        if not prompt or not prompt.strip():
            raise gr.Error("Write a prompt first.")
        full = with_trigger(prompt, self.trigger) if add_trigger else prompt.strip()
        size = max(16, int(size) // 16 * 16)
        image = self.render(full, seed, steps, guidance, scale, size)
        base = self.render(full, seed, steps, guidance, 0.0, size) if compare and scale > 0 else None
        note = f"`{full}` · seed {int(seed)} · {int(steps)} steps · guidance {guidance:g} · LoRA scale {scale:g}"
        return image, base, note


def build_demo(gen: Generator) -> gr.Blocks:
    with gr.Blocks(title="FLUX.1 Impressionism LoRA") as demo:
        gr.Markdown(f"# FLUX.1 Impressionism LoRA\nModel: `{gen.label}`. Trigger: **{gen.trigger}**. "
                    "LoRA scale 0 is the base model; tick *compare* to see base and LoRA from the same seed.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=2, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    steps = gr.Slider(1, 50, value=28 if gen.size >= 512 else 4, step=1, label="Steps")
                with gr.Row():
                    guidance = gr.Slider(0.0, 10.0, value=3.5, step=0.1, label="Guidance")
                    scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA scale (0 = base)")
                with gr.Row():
                    add_trigger = gr.Checkbox(value=True, label=f'Add trigger ("{gen.trigger}")')
                    compare = gr.Checkbox(value=True, label="Compare with the base model")
                with gr.Accordion("Advanced", open=False):
                    size = gr.Slider(16, 1536, value=gen.size, step=16, label="Image size (px)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(EXAMPLES, inputs=prompt)
            with gr.Column(scale=3):
                with gr.Row():
                    lora_img = gr.Image(label="base + LoRA", type="pil", height=360, elem_id="lora-image")
                    base_img = gr.Image(label="base (LoRA scale 0)", type="pil", height=360, elem_id="base-image")
                info = gr.Markdown(elem_id="info")
        button.click(_gpu(gen), [prompt, seed, steps, guidance, scale, add_trigger, compare, size],
                     [lora_img, base_img, info], api_name="generate")
    return demo


def _gpu(fn):
    """On a ZeroGPU Space (the ``spaces`` package present) run the call on a lent GPU."""
    try:
        import spaces

        return spaces.GPU(duration=120)(fn)
    except ImportError:
        return fn


def launch(demo: gr.Blocks, **kwargs):
    """``demo.launch`` with the app's CSS (gradio 6 takes it at launch)."""
    return demo.launch(css=CSS, **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=env("FLUXIMP_BASE", DEFAULT_BASE))
    ap.add_argument("--adapter", default=env("FLUXIMP_ADAPTER"))
    ap.add_argument("--trigger", default=env("FLUXIMP_TRIGGER"))
    ap.add_argument("--device", default=env("FLUXIMP_DEVICE"))
    ap.add_argument("--offload", action="store_true", default=env("FLUXIMP_OFFLOAD") == "1")
    ap.add_argument("--host", default=env("GRADIO_SERVER_NAME", "0.0.0.0"))
    ap.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    gen = Generator(args.base, args.adapter, args.trigger, args.device, args.offload)
    launch(build_demo(gen).queue(max_size=8), server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
