"""Sequential diffusion tokenizer: images ↔ 1-D code sequences whose order follows the diffusion process."""

from tokenizer.config import TOKENIZER_PRESETS, PixelDecoderConfig, TokenizerConfig, from_official, load_tokenizer_config
from tokenizer.flow import GroupSchedule, SequentialSampler
from tokenizer.loading import StateDictMismatchError, convert_official_state_dict
from tokenizer.model import DARTokenizer, TokenizerTrainOutput, load_tokenizer_from_official

__all__ = [
    "TOKENIZER_PRESETS",
    "DARTokenizer",
    "GroupSchedule",
    "PixelDecoderConfig",
    "SequentialSampler",
    "StateDictMismatchError",
    "TokenizerConfig",
    "TokenizerTrainOutput",
    "convert_official_state_dict",
    "from_official",
    "load_tokenizer_config",
    "load_tokenizer_from_official",
]
