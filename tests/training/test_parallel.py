"""Tensor parallelism, FSDP2 and a two-node launch, each as 2 CPU processes over gloo (docs/distributed.md).

Each test launches `torch.distributed.run` on tests/training/distributed_worker.py (or scripts/train.py) and compares
what the ranks wrote with the same computation in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_tensor_attn  # noqa: F401  (registers the model with the Auto classes)
from hf_tensor_attn.arguments import parse_args
from tests.training.distributed_worker import LAYOUTS, PER_RANK_BATCH, free_port, full_state, inference_record, train

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "training" / "distributed_worker.py"
HEADS = 4


def launch(*commands, timeout=240):
    """Run the commands at once (one per "node") with 1 thread each and no GPU; fail with their stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    try:
        results = [p.communicate(timeout=timeout) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for _, stderr, code in results:
        assert code == 0, stderr[-4000:]


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """Tensor + standard layers, 4 heads (2 per rank at tp=2), weights large enough for varied greedy tokens."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "tensor_attn", hidden_size=32, num_hidden_layers=3, num_attention_heads=HEADS, initializer_range=0.3,
        layer_types=["tensor_attention", "full_attention", "tensor_attention"],
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("hybrid")
    model.save_pretrained(path)
    return model, path


def test_column_split_of_k_proj_keeps_both_streams_of_each_head(hybrid):
    """What the colwise rule does to a tensor layer's k_proj / v_proj: a contiguous split of the output rows. Each
    half, read with the layer's own view, must be the full projection's heads 0..H/2-1 and H/2..H-1, k1 | k2 intact."""
    model, _ = hybrid
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    for proj in (attn.k_proj, attn.v_proj):
        full = proj(x).view(2, 5, HEADS, -1)  # [B, T, H, 2D]
        for rank, rows in enumerate(proj.weight.chunk(2, dim=0)):
            local = (x @ rows.T).view(2, 5, -1, 2 * attn.head_dim)  # [B, T, H/2, 2D], as the layer views it
            torch.testing.assert_close(local, full[:, :, rank * HEADS // 2 : (rank + 1) * HEADS // 2], rtol=0, atol=0)


def test_tensor_parallel_matches_one_process(hybrid, tmp_path):
    model, path = hybrid
    launch(torchrun(WORKER, "tp", path, tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    reference = inference_record(model)
    assert [r["world_size"] for r in ranks] == [2, 2]

    for r, rank in enumerate(ranks):  # `pytest -s` shows the measured numbers that docs/distributed.md quotes
        print(f"tp rank {r}: max |logits - one process| = {(rank['logits'] - reference['logits']).abs().max():.1e}",
              {layout: (rank[layout]["memory_bytes"], reference[layout]["memory_bytes"]) for layout in LAYOUTS})
        torch.testing.assert_close(rank["logits"], reference["logits"], rtol=0, atol=1e-5)
        for layout in LAYOUTS:
            mine, theirs = rank[layout], reference[layout]
            assert len(set(theirs["sequences"][0, -12:].tolist())) > 3  # a degenerate reference would prove little
            assert torch.equal(mine["sequences"], theirs["sequences"]), layout
            # float32, relative to the largest score (6.3 here): o_proj and down_proj add the ranks' partial sums in
            # another order than one matmul does, and decoding compounds that over 12 steps (measured 1.3e-5).
            scale = theirs["scores"].abs().max().item()
            torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=0, atol=1e-5 * scale)
            # Every cache layer, tensor or standard, holds only this rank's heads.
            assert theirs["heads"] == [HEADS] * 3 and mine["heads"] == [HEADS // 2] * 3, layout
            # Per-head storage halves; what has no head axis (positions, padding, pair indices) is on both ranks.
            per_head = theirs["memory_bytes"] - theirs["replicated_bytes"]
            assert mine["replicated_bytes"] == theirs["replicated_bytes"], layout
            assert mine["memory_bytes"] == per_head // 2 + mine["replicated_bytes"], layout
            if layout == "four_cache":
                assert 2 * mine["memory_bytes"] == theirs["memory_bytes"]


def test_tensor_parallel_with_a_poly_layer_matches_one_process(tmp_path):
    """A `poly_tensor_attention` layer viewed its projections with the full head count: `RuntimeError: shape
    '[1, 4, 4, 8]' is invalid` on both ranks. Each rank now holds half the heads of its poly state as well."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "tensor_attn", hidden_size=32, num_hidden_layers=3, num_attention_heads=HEADS, initializer_range=0.3,
        layer_types=["poly_tensor_attention", "full_attention", "tensor_attention"],
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    launch(torchrun(WORKER, "tp", tmp_path / "model", tmp_path))
    reference = inference_record(model)
    for r in (0, 1):
        rank = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(rank["logits"], reference["logits"], rtol=0, atol=1e-5)
        for layout in LAYOUTS:
            mine, theirs = rank[layout], reference[layout]
            assert len(set(theirs["sequences"][0, -12:].tolist())) > 3, layout  # not a degenerate reference
            assert torch.equal(mine["sequences"], theirs["sequences"]), layout
            assert theirs["heads"] == [HEADS] * 3 and mine["heads"] == [HEADS // 2] * 3, layout


# The workers run one thread each (OMP_NUM_THREADS=1); the one-process reference must too, or its GEMMs sum in
# another order and ten training steps drift apart by more than the tolerance (seen at 1.6e-4 with two threads).
@pytest.mark.usefixtures("one_thread")
def test_fsdp2_training_matches_one_process_and_reloads(hybrid, tmp_path):
    _, path = hybrid
    launch(torchrun(WORKER, "fsdp", path, tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = train(model, tmp_path / "single", 2 * PER_RANK_BATCH)  # one process, the same global batches
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.0, losses
    reference = full_state(model)
    for r, rank in enumerate(ranks):
        gaps = (torch.tensor(rank["losses"]) - torch.tensor(losses)).abs().max()
        params = max((rank["state"][name] - value).abs().max() for name, value in reference.items())
        print(f"fsdp rank {r}: losses {losses[0]:.3f} -> {losses[-1]:.3f}, max |loss - one process| = {gaps:.1e}, "
              f"max |parameter - one process| = {params:.1e}")
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(losses), rtol=0, atol=1e-4)
        assert rank["state"].keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(rank["state"][name], value, rtol=0, atol=1e-4, msg=name)
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name

    # The gathered checkpoint (Trainer.save_model) and the sharded one (one file per rank) load as one model.
    sharded = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(sharded) == 2, sharded
    for folder in ("full", "sharded"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        state = full_state(loaded)
        assert state.keys() == ranks[0]["state"].keys()
        for name, value in state.items():
            assert torch.equal(value, ranks[0]["state"][name]), (folder, name)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


def test_two_nodes_on_loopback_end_with_identical_parameters(tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1` twice, as on two machines, meeting at a c10d rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in (0, 1):
        nodes.append([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes",
            str(ROOT / "scripts" / "train.py"), str(ROOT / "configs" / "match3-tiny.json"),
            "--max_steps=4", "--logging_steps=1", "--eval_strategy=no", "--save_strategy=no", "--disable_tqdm=true",
            f"--output_dir={tmp_path / f'node{node}'}", "--write_param_checksums=true",
        ])
    launch(*nodes)
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("node*/param_checksums/rank*.json"))]
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["global_step"] for r in records] == [4, 4]
    assert records[0]["sha256"] == records[1]["sha256"]


@pytest.mark.parametrize("route", ["accelerate config", "Trainer arguments"])
def test_accelerate_fsdp2_routes_shard_each_decoder_layer(hybrid, monkeypatch, route):
    """The two routes into accelerate's FSDP2 plugin: configs/accelerate/fsdp-multigpu.yaml through accelerate's own
    launcher code (the environment it gives each process), and Trainer's `fsdp` argument (`scripts/train.py --fsdp`). Both must
    ask for FSDP2 with a full state dict at save, and the plugin must wrap exactly our decoder layers. Running them
    needs GPUs: accelerate 1.15 turns FSDP into DDP on CPU processes (docs/distributed.md)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    if route == "accelerate config":
        config = ROOT / "configs" / "accelerate" / "fsdp-multigpu.yaml"
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x"]))
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        for key, value in env.items():
            if key.startswith("FSDP_"):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
    else:
        # scripts/train.py's `--fsdp`: FSDP2 is the default version, the wrap units our model's _no_split_modules.
        _, _, training_args = parse_args([str(ROOT / "configs" / "match3-tiny.json"), "--fsdp"])
        plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    model, _ = hybrid
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == [f"model.layers.{i}" for i in range(3)]
