#!/usr/bin/env python
"""Convert a pretrained Llama (or Mistral / Qwen2) into a hybrid tensor-attention model with the same outputs.

    python scripts/convert_llama.py SOURCE OUTPUT_DIR --tensor_layers 3 7
    python scripts/train.py configs/text-bytes.json --init_from OUTPUT_DIR --lora_r 8 ...   # then fine-tune

SOURCE is a local directory (or hub name) that `AutoModelForCausalLM.from_pretrained` loads. OUTPUT_DIR receives the
converted model (safetensors; loads with `AutoModelForCausalLM` after `import hf_tensor_attn`, or with
`trust_remote_code=True`) and the source's tokenizer. See `hf_tensor_attn.convert` for what the conversion does.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoTokenizer

from hf_tensor_attn.arguments import check_pretrained_source
from hf_tensor_attn.convert import convert_from_llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_llama.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="pretrained Llama-architecture model: a directory or hub name")
    parser.add_argument("output_dir", help="where to save the converted model and the source's tokenizer")
    parser.add_argument("--tensor_layers", type=int, nargs="+", required=True,
                        help="indices of the layers that become tensor layers (negative: from the end)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the converted weights (default: the source's)")
    parser.add_argument("--config_overrides", type=json.loads, default=None,
                        help='TensorAttnConfig fields as JSON, e.g. \'{"w1": 512, "w2": 64}\' (windows shorter than '
                             "the context break the exact start)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save with the model (default: the source's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    tokenizer_source = args.tokenizer or args.source
    try:
        check_pretrained_source("source", args.source)
        if args.tokenizer is not None:
            check_pretrained_source("--tokenizer", args.tokenizer)
        try:
            # Before converting: a source without a tokenizer used to convert, then fail, and save nothing.
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"no tokenizer loads from {tokenizer_source!r} ({type(e).__name__}: {e}); pass "
                             "--tokenizer NAME_OR_PATH (the tokenizer the source model was trained with)") from e
        model = convert_from_llama(args.source, args.tensor_layers, config_overrides=args.config_overrides,
                                   dtype=DTYPES.get(args.dtype))
    except ValueError as e:
        print(f"convert_llama.py: error: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    layers = [i for i, t in enumerate(model.config.layer_types) if t == "tensor_attention"]
    print(f"saved {args.output_dir}: {model.config.num_hidden_layers} layers, tensor layers {layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
