"""Self-contained checkpoints (issue 34): `save_pretrained(..., self_contained=True)` writes the package's code into
the folder; a process that cannot import hf_tensor_attn (nor accelerate, datasets, triton, ...) loads it with
`trust_remote_code=True` (Auto classes and pipeline), generates the in-process tokens with each layout, trains, and
saves the same files again."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from hf_tensor_attn import TensorAttnByteTokenizerFast, available_cache_implementations, remote_code
from hf_tensor_attn.cache import LAYOUTS
from hf_tensor_attn.compat import REMOTE_MODULE
from tests.models.test_transformers_api import run_fresh_python


def train_two_steps(model, batch) -> list[float]:
    """Two SGD steps on the batch; the loss before each (run here and, as source, in the fresh process)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(2):
        loss = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


LAYOUT_NAMES = [n for n in available_cache_implementations() if not LAYOUTS[n].changes_the_kernel]
PROMPTS = ["|adg", "hello wor", "x"]

# What the package brings beyond torch and transformers, hidden from the fresh process (with the package itself),
# so that it runs as an environment with only those two would.
NOT_IN_A_BARE_ENVIRONMENT = ["hf_tensor_attn", "accelerate", "datasets", "triton", "ninja", "peft", "psutil"]
HIDE = """
import importlib.machinery, json, sys
hidden = set(json.loads(sys.argv[5]))
path_finder = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):
    return None if name.split(".")[0] in hidden else path_finder(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # pip install -e's own finder
"""

FRESH_SCRIPT = HIDE + """
import json, sys
import torch
""" + inspect.getsource(train_two_steps) + """
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
path, resaved = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64).eval()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
batch = tok(json.loads(sys.argv[3]), return_tensors="pt", padding=True)
tokens = {}
for layout in json.loads(sys.argv[4]):
    torch.manual_seed(0)
    tokens[layout] = model.generate(**batch, max_new_tokens=8, do_sample=False, cache_implementation=layout).tolist()
text = pipeline("text-generation", model=path, trust_remote_code=True)("abc", max_new_tokens=4, do_sample=False)
losses = train_two_steps(model, batch)
model.save_pretrained(resaved)
tok.save_pretrained(resaved)
ours = sorted(name for name in sys.modules if name.split(".")[0] in hidden)
print(json.dumps({"tokens": tokens, "losses": losses, "text": text[0]["generated_text"], "types":
                  [type(config).__name__, type(model).__name__, type(tok).__name__], "modules": ours}))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tests.conftest import tiny_model

    torch.manual_seed(0)
    model = tiny_model(initializer_range=0.2, layer_types=["tensor_attention", "full_attention"], w1=6, w2=5)
    path = tmp_path_factory.mktemp("self_contained") / "model"
    model.save_pretrained(path, self_contained=True)
    TensorAttnByteTokenizerFast().save_pretrained(path, self_contained=True)
    return model, path


def code_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.py")}


def test_the_folder_holds_what_transformers_copies_and_only_base_imports(saved):
    _, path = saved
    files = code_files(path)
    assert f"{REMOTE_MODULE}.py" in files and "hf_tensor_attn__modeling.py" in files
    copied = {p.split("/")[-1] for p in get_relative_import_files(path / f"{REMOTE_MODULE}.py")}
    assert copied == set(files) - {f"{REMOTE_MODULE}.py"}  # the loader reaches every file written, and no other
    available = remote_code.available_imports()
    for name in files:
        assert set(get_imports(path / name)) <= available, name
    assert {"hf_tensor_attn__ops__exact__tiled.py", "hf_tensor_attn__ops__poly__chunk.py",
            "hf_tensor_attn__ops__subgen__clustering.py"} <= set(files)  # the ops' sub-packages, flattened
    assert "hf_tensor_attn__ops__exact__triton_kernels.py" not in files  # needs triton, which torch alone does not bring
    # where the package imports the kernels on first use, the copy says why they are missing
    said = "raise ModuleNotFoundError('hf_tensor_attn.ops.exact.triton_kernels (it needs triton) is not part of this"
    assert said in files["hf_tensor_attn__ops__dispatch.py"].decode()  # the door imports them
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"{REMOTE_MODULE}.TensorAttnForCausalLM"


def test_a_process_without_the_package_loads_generates_trains_and_resaves(saved, tmp_path):
    model, path = saved
    tok = TensorAttnByteTokenizerFast()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    expected = {}
    for layout in LAYOUT_NAMES:
        torch.manual_seed(0)
        expected[layout] = model.generate(**batch, max_new_tokens=8, do_sample=False,
                                          cache_implementation=layout).tolist()
    resaved = tmp_path / "resaved"
    run = run_fresh_python(FRESH_SCRIPT, str(path), str(resaved), json.dumps(PROMPTS), json.dumps(LAYOUT_NAMES),
                           json.dumps(NOT_IN_A_BARE_ENVIRONMENT), tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"four_cache", "two_cache", "subgen4"} <= set(result["tokens"])
    assert result["tokens"] == expected
    assert result["types"] == ["TensorAttnConfig", "TensorAttnForCausalLM", "TensorAttnByteTokenizerFast"]
    assert result["text"].startswith("abc")
    assert result["modules"] == []  # neither the package nor what it alone brings ran there
    losses = train_two_steps(model.__class__.from_pretrained(path, dtype=torch.float64), batch)  # here, the same
    assert result["losses"] == pytest.approx(losses, rel=1e-9) and losses[1] < losses[0]
    assert code_files(resaved) == code_files(path)  # a self-contained copy saves itself again, byte for byte


def test_relative_imports_in_sub_packages_name_the_flat_files(tmp_path):
    """A sub-package's `__init__` and a module inside it: `.name`, `..name` and `from .package import module` resolve
    against the package's own files (modules bound as modules, names as names) and point at the flat files."""
    (tmp_path / "exact").mkdir()
    init = tmp_path / "exact" / "__init__.py"
    init.write_text("from .naive import naive_tensor_attention\nfrom ..common import repeat_kv\n")
    assert remote_code.rewrite(remote_code.Source("ops.exact", init), {}) == (
        "from .hf_tensor_attn__ops__exact__naive import naive_tensor_attention\n"
        "from .hf_tensor_attn__ops__common import repeat_kv\n")
    module = tmp_path / "exact" / "decode.py"
    module.write_text("from ..common import fold_groups\nfrom .tiles import plan\nfrom .. import backend\n"
                      "from ..exact import tiled as t\nfrom ...cache import base\n")
    assert remote_code.rewrite(remote_code.Source("ops.exact.decode", module), {}) == (
        "from .hf_tensor_attn__ops__common import fold_groups\n"
        "from .hf_tensor_attn__ops__exact__tiles import plan\n"
        "from . import hf_tensor_attn__ops__backend as backend\n"
        "from . import hf_tensor_attn__ops__exact__tiled as t\n"
        "from . import hf_tensor_attn__cache__base as base\n")
    left_out = {"ops.exact.triton_kernels": ["triton"]}
    lazy = tmp_path / "dispatch.py"
    lazy.write_text("def run():\n    from .exact import decode, triton_kernels\n")
    assert "raise ModuleNotFoundError('hf_tensor_attn.ops.exact.triton_kernels (it needs triton)" in (
        remote_code.rewrite(remote_code.Source("ops.dispatch", lazy), left_out))


def test_self_contained_must_be_a_bool(tmp_path, make_model):
    with pytest.raises(ValueError, match=r"`self_contained` must be True, False or None .*got 'yes'"):
        make_model().save_pretrained(tmp_path / "m", self_contained="yes")
    assert not (tmp_path / "m").exists()


def test_saves_into_a_self_contained_folder_keep_it_so_unless_told(tmp_path, make_model):
    """A tokenizer saved by default beside a self-contained model must not put the package stub back; an explicit
    self_contained=False replaces the code by the stub and leaves no stale copies."""
    folder = tmp_path / "model"
    make_model().save_pretrained(folder, self_contained=True)
    written = code_files(folder)
    TensorAttnByteTokenizerFast().save_pretrained(folder)
    make_model().save_pretrained(folder)
    assert code_files(folder) == written and remote_code.is_self_contained(folder)
    make_model().save_pretrained(folder, self_contained=False)
    assert sorted(code_files(folder)) == [f"{REMOTE_MODULE}.py"] and not remote_code.is_self_contained(folder)
    assert "Loading needs the `hf_tensor_attn` package" in (folder / "README.md").read_text()  # our card follows
