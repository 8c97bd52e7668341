"""Tensor (2-simplicial) attention for Hugging Face transformers.

Importing the package registers model_type "tensor_attn" with AutoConfig, AutoModel, AutoModelForCausalLM and
AutoTokenizer, and, when peft is installed, its default LoRA target modules.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from . import compat
from .cache import TensorAttnCache, available_cache_implementations
from .configuration import TensorAttnConfig, TensorAttnConfigError
from .convert import convert_from_llama
from .modeling import TensorAttnForCausalLM, TensorAttnModel, TensorAttnPreTrainedModel
from .ops import naive_tensor_attention, tensor_attention
from .tokenization import TensorAttnByteTokenizer
from .tokenization_fast import TensorAttnByteTokenizerFast

AutoConfig.register(TensorAttnConfig.model_type, TensorAttnConfig, exist_ok=True)
AutoModel.register(TensorAttnConfig, TensorAttnModel, exist_ok=True)
AutoModelForCausalLM.register(TensorAttnConfig, TensorAttnForCausalLM, exist_ok=True)
# As transformers 5 does for its own models, AutoTokenizer gives the fast tokenizer, also for a folder saved by the slow
# one; `TensorAttnByteTokenizer.from_pretrained` loads the slow one.
AutoTokenizer.register(TensorAttnConfig, slow_tokenizer_class=TensorAttnByteTokenizer,
                       fast_tokenizer_class=TensorAttnByteTokenizerFast, exist_ok=True)

compat.check_transformers_version()
compat.register_peft_lora_targets(TensorAttnConfig.model_type)

__version__ = "0.1.0"

__all__ = [
    "TensorAttnByteTokenizer",
    "TensorAttnByteTokenizerFast",
    "TensorAttnCache",
    "TensorAttnConfig",
    "TensorAttnConfigError",
    "TensorAttnForCausalLM",
    "TensorAttnModel",
    "TensorAttnPreTrainedModel",
    "available_cache_implementations",
    "convert_from_llama",
    "naive_tensor_attention",
    "tensor_attention",
]
