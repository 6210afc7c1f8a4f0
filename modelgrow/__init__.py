"""ModelGrow: continual pre-training of text-to-video diffusion transformers (Open-Sora v1.0 STDiT) with
model expansion and LLM language-understanding enhancement."""

__version__ = "0.1.0"

from .accelerate import accelerate  # noqa: E402
from .models import STDiT, create_model, from_pretrained, load_checkpoint, save_pretrained  # noqa: E402

__all__ = ["__version__", "STDiT", "accelerate", "create_model", "from_pretrained", "load_checkpoint", "save_pretrained"]
