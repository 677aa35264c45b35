"""The one "is the Hugging Face Hub offline" check, for every stage that may reach the Hub.

It is huggingface_hub's own answer (``HF_HUB_OFFLINE``, read when huggingface_hub is first
imported), so the project and the libraries it calls always agree on it."""
from __future__ import annotations


def offline() -> bool:
    from huggingface_hub import is_offline_mode

    return bool(is_offline_mode())
