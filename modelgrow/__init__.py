"""ModelGrow: continual pre-training of text-to-video diffusion transformers (Open-Sora v1.0 STDiT) with
model expansion and LLM language-understanding enhancement."""

__version__ = "0.1.0"

from .accelerate import accelerate  # noqa: E402
from .models import STDiT, create_model, from_pretrained, load_checkpoint, save_pretrained  # noqa: E402

__all__ = ["__version__", "STDiT", "ModelGrowPipeline", "accelerate", "create_model", "from_pretrained", "load_checkpoint",
           "save_pretrained"]

try:  # the pipeline (and its registration with diffusers) needs the inference dependencies
    from .pipeline import ModelGrowPipeline  # noqa: E402
except ImportError:  # pragma: no cover - a training-only install
    __all__.remove("ModelGrowPipeline")
