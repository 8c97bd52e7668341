"""transformers' common model tests, run on this package as a model test file inside transformers is written.

`ModelTesterMixin`, `ConfigTester` and `TrainingTesterMixin` come from the source distribution of the installed
transformers (tests/models/upstream_tests.py fetches it; without it this module skips naming the reason, and fails
under CI=true, where the suite must run). With a transformers other than the pinned one it skips.
Three classes run them on one harness: the hybrid model (tensor_attention, full_attention), the all-standard model
(full_attention, full_attention), and transformers' own Llama as the control. `GenerationTesterMixin` is not in
the sdist; `GenerationChecks` below covers its generate checks that concern a model rather than `generate`
(dict outputs, assisted decoding, inputs_embeds, the cache format).

Every skip or override here that the Llama control does not share says why.
"""

from __future__ import annotations

import os
import unittest
from unittest import mock

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.auto import modeling_auto

import hf_tensor_attn  # noqa: F401  (registers the Auto classes)
from hf_tensor_attn import TensorAttnConfig, TensorAttnForCausalLM, TensorAttnModel, compat
from tests.models import upstream_tests

pytest.importorskip("parameterized", reason="transformers' test_modeling_common.py imports `parameterized`")


class GenerationChecks:
    """What GenerationTesterMixin (tests/generation/test_utils.py, not in the sdist) checks of a model, in short:
    generate's dict outputs carry one attention / hidden-state entry per layer and step, with the shapes
    transformers documents; assisted decoding and generation from `inputs_embeds` give greedy's tokens."""

    max_new_tokens = 3

    def _generate_inputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        return config, inputs["input_ids"][:2], inputs["attention_mask"][:2]

    def _causal_lm(self, config):
        return self.model_tester.causal_lm_class(config).eval()

    def test_generate_dict_outputs_attentions_and_hidden_states(self):
        config, input_ids, attention_mask = self._generate_inputs()
        config._attn_implementation = "eager"  # the backend that returns weights
        model = self._causal_lm(config)
        out = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.max_new_tokens,
            do_sample=False, return_dict_in_generate=True, output_attentions=True, output_hidden_states=True,
            output_scores=True, output_logits=True,
        )
        B, T = input_ids.shape
        H, L = config.num_attention_heads, config.num_hidden_layers
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(B, self.max_new_tokens)], dim=1)
        self.assertEqual(out.sequences.shape, (B, T + self.max_new_tokens))
        self.assertEqual(len(out.scores), self.max_new_tokens)
        self.assertEqual(len(out.attentions), self.max_new_tokens)
        self.assertEqual(len(out.hidden_states), self.max_new_tokens)
        for step, (attentions, hidden) in enumerate(zip(out.attentions, out.hidden_states)):
            queries = T if step == 0 else 1  # the prompt, then one token per step
            self.assertEqual(len(attentions), L)
            self.assertEqual(len(hidden), L + 1)
            real = full_mask[:, T + step - queries : T + step].bool()  # [B, queries]
            for weights in attentions:
                self.assertEqual(weights.shape, (B, H, queries, T + step))
                # A real query's weights are a distribution over the keys it may see (pad queries: any finite row).
                sums = weights.sum(-1).transpose(1, 2)[real]  # [real queries, H]
                torch.testing.assert_close(sums, torch.ones_like(sums))
            for states in hidden:
                self.assertEqual(states.shape, (B, queries, config.hidden_size))

    def test_assisted_decoding_matches_greedy(self):
        config, input_ids, attention_mask = self._generate_inputs()
        input_ids, attention_mask = input_ids[:1], attention_mask[:1]  # assisted generate takes one row
        model = self._causal_lm(config)
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=self.max_new_tokens + 2,
                      min_new_tokens=self.max_new_tokens + 2, do_sample=False)
        greedy = model.generate(input_ids, **kwargs)
        assistant = self._causal_lm(config)  # the model as its own assistant: every draft token is accepted
        assisted = model.generate(input_ids, assistant_model=assistant, **kwargs)
        torch.testing.assert_close(assisted, greedy, rtol=0, atol=0)

    def test_past_key_values_format(self):
        """GenerationTesterMixin's check assumes every layer holds keys and values of head_dim features: ours hold
        k1 | k2 and v1 | v2 side by side (2 * head_dim) in tensor layers. Same check, with the width per layer."""
        config, input_ids, attention_mask = self._generate_inputs()
        model = self.model_tester.base_model_class(config).eval()
        cache = model(input_ids, attention_mask=attention_mask, use_cache=True).cache
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        self.assertEqual(len(cache.layers), config.num_hidden_layers)
        for layer, layer_type in zip(cache.layers, layer_types):
            width = config.head_dim * (2 if layer_type == "tensor_attention" else 1)
            expected = (input_ids.shape[0], config.num_key_value_heads, input_ids.shape[1], width)
            self.assertEqual(tuple(layer.keys.shape), expected)
            self.assertEqual(tuple(layer.values.shape), expected)

    def test_generate_from_inputs_embeds_matches_input_ids(self):
        config, input_ids, attention_mask = self._generate_inputs()
        model = self._causal_lm(config)
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
                      min_new_tokens=self.max_new_tokens, do_sample=False)
        from_ids = model.generate(input_ids, **kwargs)
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(input_ids), **kwargs)
        # With inputs_embeds, generate returns the new tokens only.
        torch.testing.assert_close(from_embeds, from_ids[:, input_ids.shape[1]:], rtol=0, atol=0)


if transformers.__version__ != compat.NEWEST_TESTED:
    # .ci/run's second environment (the oldest supported transformers) runs the package's own tests; the common
    # suite is of the pinned release, and running another release's copy too would double its CI time.
    pytest.skip(
        f"transformers' common tests run with the pinned transformers {compat.NEWEST_TESTED}, installed: "
        f"{transformers.__version__}", allow_module_level=True,
    )
try:
    UPSTREAM = upstream_tests.load(GenerationChecks)
except upstream_tests.UpstreamTestsUnavailable as error:
    if os.environ.get("CI") == "true":  # CI must run the suite: a skip there would hide that it never ran
        pytest.fail(f"transformers' common tests are unavailable in CI: {error}", pytrace=False)
    pytest.skip(f"transformers' common tests are unavailable: {error}", allow_module_level=True)
ModelTesterMixin = UPSTREAM["test_modeling_common"].ModelTesterMixin
ids_tensor = UPSTREAM["test_modeling_common"].ids_tensor
random_attention_mask = UPSTREAM["test_modeling_common"].random_attention_mask
ConfigTester = UPSTREAM["test_configuration_common"].ConfigTester
TrainingTesterMixin = UPSTREAM["test_training_mixin"].TrainingTesterMixin


class CausalLMTester:
    """A model tester as transformers' own causal LM tests have (tiny config: hidden 32, 2 layers, 4 heads, vocab
    99); subclasses name the classes and the config."""

    config_class = base_model_class = causal_lm_class = None
    sequence_classification_class = None

    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                 max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2):
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.max_position_embeddings = num_key_value_heads, max_position_embeddings
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.head_dim = hidden_size // num_attention_heads

    def config_kwargs(self) -> dict:
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class LlamaTester(CausalLMTester):
    config_class, base_model_class, causal_lm_class = LlamaConfig, LlamaModel, LlamaForCausalLM


class TensorAttnTester(CausalLMTester):
    config_class, base_model_class, causal_lm_class = TensorAttnConfig, TensorAttnModel, TensorAttnForCausalLM
    layer_types = ("tensor_attention", "full_attention")

    def config_kwargs(self) -> dict:
        return {**super().config_kwargs(), "layer_types": list(self.layer_types)}


class StandardTester(TensorAttnTester):
    layer_types = ("full_attention", "full_attention")


class CommonTests(ModelTesterMixin, GenerationChecks, TrainingTesterMixin):
    """The test class body of a transformers causal LM test (`CausalLMModelTest` is not in the sdist either)."""

    model_tester_cls = None

    @property
    def model_tester(self):
        return self._model_tester

    def setUp(self):
        self._model_tester = self.model_tester_cls(self)
        # The tests pick labels and the training path from transformers' tables of its own model names, where
        # a plugin is not listed: list ours there for the duration of the test (Llama is listed already).
        config_class = self.model_tester_cls.config_class
        if config_class.model_type not in modeling_auto.MODEL_MAPPING_NAMES:
            tester = self.model_tester_cls
            for table, cls in ((modeling_auto.MODEL_MAPPING_NAMES, tester.base_model_class),
                               (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, tester.causal_lm_class)):
                self.enterContext(mock.patch.dict(table, {config_class.model_type: cls.__name__}))
        self.config_tester = ConfigTester(
            self, config_class=self.model_tester_cls.config_class, **self._model_tester.config_kwargs()
        )

    def test_config(self):
        self.config_tester.run_common_tests()


class LlamaControlTest(CommonTests, unittest.TestCase):
    """transformers' Llama on the same harness: what the tests ask of a model that ships inside transformers."""

    model_tester_cls = LlamaTester
    all_model_classes = (LlamaModel, LlamaForCausalLM)


class TensorAttnCommonTests(CommonTests):
    """The upstream tests this model cannot take as written, each with the reason (Llama runs them all)."""

    @unittest.skip(
        "dynamic RoPE is refused by design (hf_tensor_attn.compat item 9: its frequencies change with the longest "
        "position seen, which every cache layout would have to track); linear and yarn run in "
        "test_model_rope_scaling_from_config_*"
    )
    def test_model_rope_scaling_from_config_1_dynamic(self):
        pass

    @unittest.skip(
        "checks linear and dynamic RoPE scaling in one test, and dynamic RoPE is refused by design (compat item 9); "
        "linear and yarn run in test_model_rope_scaling_from_config_*"
    )
    def test_model_rope_scaling_frequencies(self):
        pass

    @unittest.skip(
        "passes a transformers DynamicCache under the old name; this model takes only its own TensorAttnCache (tensor "
        "layers hold k1 | k2 pairs). The old name `past_key_values` (deprecation message, same logits) is tested in "
        "tests/models/test_transformers_api.py"
    )
    def test_bc_cache_name_forward(self):
        pass

    @unittest.skip(
        "the model collects hidden states and attentions in its own layer loop, not through transformers' "
        "`capture_outputs` decorator / `_can_record_outputs` hooks; both outputs are checked by "
        "test_hidden_states_output and test_attention_outputs"
    )
    def test_can_capture_specific_layers_hidden_states(self):
        pass

    @unittest.skip(
        "no `capture_outputs` decorator (see test_can_capture_specific_layers_hidden_states); outputs are checked by "
        "test_hidden_states_output and test_attention_outputs"
    )
    def test_capture_outputs_decorator(self):
        pass


class TensorAttnHybridTest(TensorAttnCommonTests, unittest.TestCase):
    model_tester_cls = TensorAttnTester
    all_model_classes = (TensorAttnModel, TensorAttnForCausalLM)


class TensorAttnStandardTest(TensorAttnCommonTests, unittest.TestCase):
    model_tester_cls = StandardTester
    all_model_classes = (TensorAttnModel, TensorAttnForCausalLM)
