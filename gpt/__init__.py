"""Class-conditional GPT over MGVQ group codes: `GPT`, its `GPTConfig`, and `load_gpt` for model files."""
from gpt.config import GPTConfig
from gpt.loading import load_gpt
from gpt.model import GPT

__all__ = ["GPT", "GPTConfig", "load_gpt"]
