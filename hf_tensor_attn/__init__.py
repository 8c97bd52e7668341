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

AutoConfig.register(TensorAttnConfig.model_type, TensorAttnConfig, exist_ok=True)
AutoModel.register(TensorAttnConfig, TensorAttnModel, exist_ok=True)
AutoModelForCausalLM.register(TensorAttnConfig, TensorAttnForCausalLM, exist_ok=True)
AutoTokenizer.register(TensorAttnConfig, tokenizer_class=TensorAttnByteTokenizer, exist_ok=True)

compat.check_transformers_version()
compat.register_peft_lora_targets(TensorAttnConfig.model_type)

__version__ = "0.1.0"

__all__ = [
    "TensorAttnByteTokenizer",
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
