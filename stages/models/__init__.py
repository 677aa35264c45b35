"""Model building blocks: Flux loading (flux), quantization (quant), LoRA (lora, export), the
training step (trainer, flow, checkpoint), the encode cache (cache) and CLIP (clip)."""
