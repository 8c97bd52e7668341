import os
import tempfile

import pytest

# torch.compile's on-disk graph cache keys its CPU kernels without the instruction set ATEN_CPU_CAPABILITY selects
# (torch 2.13): a kernel built under one and loaded under the other returns NaN (AVX-512 build under avx2) or corrupts
# the heap (the reverse). Runs under another capability keep their own cache.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.environ['ATEN_CPU_CAPABILITY']}_{os.getuid()}")

import torch  # noqa: E402

import hf_tensor_attn  # noqa: F401  (registers the Auto classes)
from transformers import AutoConfig, AutoModelForCausalLM


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tests of tiny tiles and thousands of small kernels gain nothing from a
    second OpenMP thread on a shared machine, and lose to its barriers. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["compiled", "torch"])
def decode_loops(request, monkeypatch):
    """Runs a test with each one-query decode step on CPU: the compiled loops (`csrc/tiles.cpp: decode_step`, and
    `poly_step` for the `poly` cache) and the torch ops (`ops.exact.decode._decode_in_place`,
    `ops.poly.chunk._decode_step`: the paths where the library is not loaded). Fails when the chosen one did not run
    (unless the test says it runs none: `skip_check`)."""
    from hf_tensor_attn.ops import extension

    calls = []
    if request.param == "torch":
        monkeypatch.setenv(extension.ENV, "0")
    else:
        ops = extension.cpu_ops()
        if ops is None:
            pytest.skip("the compiled CPU loops could not be built here (see its RuntimeWarning)")

        class Counted:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(ops, name)

        monkeypatch.setattr(extension, "cpu_ops", lambda: Counted() if extension.enabled() else None)
    state = DecodeLoops(request.param)
    yield state
    if state.checked:
        ran = {"decode_step", "poly_step"} & set(calls)
        assert bool(ran) == (request.param == "compiled"), f"{request.param} decode: {calls}"


class DecodeLoops:
    def __init__(self, name: str):
        self.name, self.checked = name, True

    def skip_check(self):
        """For a case that runs no decode step (one that needs a gradient)."""
        self.checked = False


def tiny_model(dtype=torch.float64, **overrides):
    """A small random model for equivalence tests; float64 so differences are exact-arithmetic noise only."""
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=259)
    kwargs.update(overrides)
    config = AutoConfig.for_model("tensor_attn", **kwargs)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture
def make_model():
    return tiny_model


def left_padded_batch(lengths, vocab=259):
    """Rows of the given lengths, left-padded to the longest: (rows, ids [B, T], attention mask [B, T])."""
    rows = [torch.randint(3, vocab, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return rows, ids, mask


@pytest.fixture
def left_padded():
    return left_padded_batch


def pytest_report_header(config):
    import transformers

    return f"hf_tensor_attn tested with transformers {transformers.__version__}, torch {torch.__version__}"
