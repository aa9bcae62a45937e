"""Models whose forward returns a dict, a tuple or a Hugging Face ``ModelOutput`` are
measured as they are: the loss takes ``logits`` (else the first tensor) or the output named
by ``--model-output``. Truths: a dense float64 Hessian, and scipy's ``eigsh`` on Hessian-vector
products written here with plain autograd."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hessdiag._errors import InputError
from hessdiag.outputs import describe_outputs, select_output
from tests.conftest import dense_hessian, run_cli

HERE = Path(__file__).parent


# --------------------------------------------------------------------------- the rule


def test_the_rule_takes_logits_else_the_first_tensor():
    a, b = torch.zeros(2), torch.ones(3)
    assert select_output(a) is a
    assert select_output({"loss": a, "logits": b}) is b
    assert select_output({"hidden": None, "x": a, "y": b}) is a
    assert select_output((None, b, a)) is b
    assert select_output([a, b], "1") is b
    assert select_output((a, b), "-1") is b
    assert select_output({"x": a, "y": b}, "y") is b


@pytest.mark.parametrize("outputs, key, words", [
    ({"x": torch.zeros(1)}, "logits",
     "--model-output logits: the model returned a dict with keys x"),
    ((torch.zeros(1),), "2", "give an index from 0 to 0"),
    ((torch.zeros(1),), "x", "give an index from 0 to 0"),
    (torch.zeros(1), "logits", "which has no parts to choose from"),
    ({"x": "text"}, "x", "that part of the model's outputs is a str, not a tensor"),
    ({"x": "text"}, None, "with no tensor to take the loss of"),
])
def test_a_wrong_choice_is_one_clear_error(outputs, key, words):
    with pytest.raises(InputError, match="^.*$") as info:
        select_output(outputs, key)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_described_with_keys_and_lengths():
    assert describe_outputs({"logits": 1, "loss": 2}) == "a dict with keys logits, loss"
    assert describe_outputs((1, 2)) == "a tuple of 2"


# --------------------------------------------------------------------------- --model-output

DATA = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def data(split="train"):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g))
'''

FACTORIES = DATA + '''
from neighbour_parts_{tag} import Body      # a module beside this file


class TwoHeads(nn.Module):
    """Returns (features, logits): the first tensor is not what the loss takes."""

    def __init__(self):
        super().__init__()
        self.body, self.head = Body(), nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        return h, self.head(h)


def model(num_features, num_classes):
    torch.manual_seed(0)
    return TwoHeads()
'''

PARTS = '''
from torch import nn


class Body(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(5, 6), nn.Tanh())
'''


@pytest.fixture
def two_heads(tmp_path, monkeypatch):
    """``factories.py`` importing ``neighbour_parts_*.py`` from its own folder (not the
    working directory, not PYTHONPATH), and a checkpoint of its model's weights."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    tag = tmp_path.name.replace("-", "_")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "factories.py").write_text(FACTORIES.replace("{tag}", tag))
    (folder / f"neighbour_parts_{tag}.py").write_text(PARTS)
    monkeypatch.chdir(tmp_path)  # elsewhere: only the file's own folder finds its neighbour
    yield folder
    sys.modules.pop(f"neighbour_parts_{tag}", None)


def test_model_output_chooses_a_tuple_part_and_neighbours_import(two_heads, tmp_path):
    spec = f"{two_heads / 'factories.py'}"
    from hessdiag.specs import load_factory

    model = load_factory(f"{spec}:model")(num_features=5, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    common = ["spectrum", tmp_path / "w.pt", "--model", f"{spec}:model", "--data",
              f"{spec}:data", "--dtype", "float64", "--tol", 1e-10, "--top-k", 2, "--json"]
    x, y = load_factory(f"{spec}:data")().tensors

    def truth(part):
        H = dense_hessian(model, lambda out, t: nn.functional.cross_entropy(out[part], t),
                          [(x, y)])
        return torch.linalg.eigvalsh(H).numpy()[::-1][:2]

    # the rule takes the first tensor: the 6 features, read as 6 classes' logits (the
    # head's parameters are then unused: their rows of the Hessian are zero)
    code, out, err = run_cli([*common, "--store", tmp_path / "a.h5"])
    assert code == 0, err
    np.testing.assert_allclose(json.loads(out)["eigenvalues"], truth(0), rtol=1e-8)
    code, out, err = run_cli([*common, "--model-output", "1", "--store", tmp_path / "b.h5"])
    assert code == 0, err
    np.testing.assert_allclose(json.loads(out)["eigenvalues"], truth(1), rtol=1e-8)
    assert not np.allclose(truth(0), truth(1), rtol=1e-2)
    # a key that is not there: one line naming what the model returned
    code, out, err = run_cli([*common, "--model-output", "logits", "--store",
                              tmp_path / "c.h5"])
    assert code == 2 and err.count("\n") == 1, err
    assert "--model-output logits: the model returned a tuple of 2" in err


def test_train_records_the_choice_in_its_checkpoints(two_heads, tmp_path):
    spec = f"{two_heads / 'factories.py'}"
    code, out, err = run_cli(["train", "--model", f"{spec}:model", "--data", f"{spec}:data",
                              "--model-output", "1", "--epochs", 1, "--batch-size", 12,
                              "--run-name", "r",
                              "--checkpoint-dir", tmp_path / "ck", "--store",
                              tmp_path / "s.h5", "--quiet"])
    assert code == 0, err
    final = sorted((tmp_path / "ck" / "r").glob("*.pt"))[-1]
    assert torch.load(final, weights_only=True)["output"] == "1"
    # the checkpoint's own choice is used without --model-output

    def top(*extra):
        code, out, err = run_cli(["spectrum", final, "--model", f"{spec}:model", "--data",
                                  f"{spec}:data", "--top-k", 1, "--dtype", "float64", "--tol",
                                  1e-10, "--json", "--store", tmp_path / "s.h5", *extra])
        assert code == 0, err
        return json.loads(out)["eigenvalues"][0]

    recorded = top()
    assert recorded == pytest.approx(top("--model-output", "1"), rel=1e-9)
    assert recorded != pytest.approx(top("--model-output", "0"), rel=1e-2)


# --------------------------------------------------------------------------- Hugging Face


def hvp_eigsh(model, loss_of, k=1):
    """The top ``k`` eigenvalues of the Hessian of ``loss_of(model)`` by scipy's eigsh on
    plain double-backward Hessian-vector products in float64."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = model.double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):  # the kernel with a second derivative
        grads = torch.autograd.grad(loss_of(model), params, create_graph=True,
                                    allow_unused=True)
    grads = [g if g is not None else p * 0 for g, p in zip(grads, params, strict=True)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    n = flat.numel()

    def mv(v):
        v = torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float64)
        hv = torch.autograd.grad(flat @ v, params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    return np.sort(eigsh(LinearOperator((n, n), matvec=mv, dtype=np.float64), k=k,
                         which="LA", tol=1e-12, return_eigenvectors=False))[::-1]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf")
    shutil.copy(HERE / "data" / "hf_models.py", folder / "hf_models.py")
    return folder


@pytest.mark.parametrize("name, data, loss_terms", [("gpt2", "lm_data", None),
                                                    ("bert", "classes_data", 12)])
def test_hugging_face_models_as_they_are(hf, name, data, loss_terms):
    """A GPT-2 language model on padded sequences (per-token loss) and a BERT-style
    classifier, whose forward returns a ModelOutput: no wrapper."""
    from hessdiag.specs import load_factory

    spec = str(hf / "hf_models.py")
    model = load_factory(f"{spec}:{name}")()
    weights = hf / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    code, out, err = run_cli(["spectrum", weights, "--model", f"{spec}:{name}", "--data",
                              f"{spec}:{data}", "--dtype", "float64", "--tol", 1e-10,
                              "--json", "--store", hf / f"{name}.h5"])
    assert code == 0, err
    got = json.loads(out)
    ds = load_factory(f"{spec}:{data}")()
    inputs, targets = ds.collate_fn([ds[i] for i in range(len(ds))])  # one batch: all

    def loss_of(m):
        logits = m(**inputs).logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=-100)

    truth = hvp_eigsh(model, loss_of)
    assert all(got["converged"])
    assert got["eigenvalues"][0] == pytest.approx(truth[0], rel=1e-7)
    terms = int((targets != -100).sum())
    assert got["samples"] == len(ds) and got["loss_terms"] == (loss_terms or terms)


def test_the_hugging_face_example_of_the_tasks_page_runs_as_written(hf, tmp_path,
                                                                    monkeypatch):
    page = (HERE.parent / "docs" / "tasks.md").read_text()
    section = page[page.index("A Hugging Face model is used as it is"):]
    code = section[section.index("```python\n# hf.py\n") + 10:]
    (tmp_path / "hf.py").write_text(code[:code.index("```")])
    commands = section[section.index("```\npython -c") + 4:]
    commands = commands[:commands.index("```")].strip().splitlines()
    assert commands[0].startswith('python -c "') and commands[1].startswith("hessdiag ")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    exec(commands[0][len('python -c "'):-1], {})  # noqa: S102 - the page's own command
    sys.modules.pop("hf", None)
    code, out, err = run_cli(commands[1].split()[1:])
    assert code == 0, err
    assert "16 samples" in out and (tmp_path / "hf.h5").exists()
    code, shown, err = run_cli(["show", tmp_path / "hf.h5", "--json"])
    assert code == 0, err
    (analysis,) = json.loads(shown)["analyses"]
    assert analysis["n_eigenvalues"] == 2 and analysis["all_converged"]
    assert analysis["lambda_max"] > 0 and analysis["model"] == "hf.py:model"


MISFIT = DATA + '''

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 3)

    def forward(self, x):
        return {"hidden": self.a(x).reshape(-1, 3, 2), "scores": self.b(x)}


def model():
    return Net()
'''


def test_an_output_the_loss_cannot_take_names_the_part_taken(tmp_path):
    (tmp_path / "misfit.py").write_text(MISFIT)
    spec = str(tmp_path / "misfit.py")
    from hessdiag.specs import load_factory

    torch.save(load_factory(f"{spec}:model")().state_dict(), tmp_path / "w.pt")
    common = ["spectrum", tmp_path / "w.pt", "--model", f"{spec}:model", "--data",
              f"{spec}:data", "--store", tmp_path / "s.h5", "--json"]
    code, out, err = run_cli(common)
    assert code == 2 and err.count("\n") == 1, err
    assert "do not fit loss cross-entropy" in err
    assert ("(the loss took key hidden of the model's outputs, a dict with keys hidden, "
            "scores; --model-output KEY takes another)") in err
    assert not (tmp_path / "s.h5").exists()
    code, out, err = run_cli([*common, "--model-output", "scores"])
    assert code == 0, err
