"""Stage 2 of D-AR: a class-conditional Llama GPT over the tokenizer's codes (codes → codes)."""

from autoregressive.config import GPT_PRESETS, GPTConfig
from autoregressive.generate import GuidanceSchedule, SamplingOptions, draw_uniforms, generate_codes, iter_codes
from autoregressive.model import GPT, convert_official_state_dict, gpt_config_from_yaml, load_gpt_from_official
from autoregressive.stream import StreamStep, sample_images, stream

__all__ = [
    "GPT",
    "GPTConfig",
    "GPT_PRESETS",
    "GuidanceSchedule",
    "SamplingOptions",
    "StreamStep",
    "convert_official_state_dict",
    "draw_uniforms",
    "generate_codes",
    "gpt_config_from_yaml",
    "iter_codes",
    "load_gpt_from_official",
    "sample_images",
    "stream",
]
