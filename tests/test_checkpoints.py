"""Checkpoints: hessdiag's format, plain state_dicts, and everything that can be wrong."""

import pytest
import torch
from torch import nn

from hessdiag.checkpoints import CheckpointError, load_checkpoint, save_checkpoint, sha256_of
from hessdiag.models import build_model

KW = {"num_classes": 10, "in_shape": [1, 8, 8], "hidden": 8}


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return build_model("mlp", **KW)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hessdiag_format_round_trip(tmp_path, mlp):
    path = tmp_path / "c.pt"
    sha = save_checkpoint(path, mlp, model_spec="mlp", model_kwargs=KW, step=7, epoch=2,
                          run_id="run-1", data={"spec": "digits", "split": "train"},
                          optimizer_state={"lr": 0.1})
    assert sha == sha256_of(path)
    loaded = load_checkpoint(path)
    assert _same_weights(loaded.model, mlp)
    info = loaded.info
    assert (info.format, info.model_spec, info.step, info.epoch, info.run_id) == \
        ("hessdiag", "mlp", 7, 2, "run-1")
    assert info.model_kwargs == KW and info.data["spec"] == "digits" and info.sha256 == sha
    assert loaded.optimizer_state == {"lr": 0.1}
    # it is plain data: the strictest loader accepts it
    torch.load(path, weights_only=True)


def test_plain_and_wrapped_state_dicts_load_with_a_model_spec(tmp_path, mlp):
    plain = tmp_path / "plain.pt"
    torch.save(mlp.state_dict(), plain)
    assert _same_weights(load_checkpoint(plain, model_spec="mlp", model_kwargs=KW).model, mlp)
    wrapped = tmp_path / "wrapped.pt"
    ddp = {f"module.{k}": v for k, v in mlp.state_dict().items()}
    torch.save({"model_state_dict": ddp, "epoch": 3}, wrapped)
    loaded = load_checkpoint(wrapped, model_spec="mlp", model_kwargs=KW)
    assert _same_weights(loaded.model, mlp) and loaded.info.format == "state_dict"
    with pytest.raises(CheckpointError, match="plain state_dict: name its architecture"):
        load_checkpoint(plain)


def test_mismatches_name_the_keys_and_shapes(tmp_path, mlp):
    path = tmp_path / "c.pt"
    save_checkpoint(path, mlp, model_spec="mlp", model_kwargs=KW)
    with pytest.raises(CheckpointError, match=r"does not match model cnn6: missing "
                                              r"features\.0\.weight.*unexpected net\.1\.weight"):
        load_checkpoint(path, model_spec="cnn6", model_kwargs={"in_shape": [1, 8, 8]})
    with pytest.raises(CheckpointError, match=r"tensor net\.1\.weight has shape \(8, 64\) in "
                                              r"the checkpoint but \(16, 64\) in the model"):
        load_checkpoint(path, model_spec="mlp", model_kwargs={**KW, "hidden": 16})


def test_missing_corrupted_and_hostile_files(tmp_path, mlp):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, mlp, model_spec="mlp", model_kwargs=KW)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_checkpoint(truncated)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_checkpoint(text)
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": mlp.state_dict(), "payload": _Hostile(str(marker))}, hostile)
    with pytest.raises(CheckpointError, match="pass unsafe=True") as caught:
        load_checkpoint(hostile, model_spec="mlp", model_kwargs=KW)
    assert caught.value.param == "unsafe"  # the command line names its --unsafe-load
    assert not marker.exists()
    # the file really is hostile: unpickling it without the safe loader runs its code
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_whole_pickled_module_needs_unsafe(tmp_path, mlp):
    path = tmp_path / "module.pt"
    torch.save(mlp, path)
    with pytest.raises(CheckpointError, match="pass unsafe=True"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, unsafe=True)
    assert loaded.info.format == "pickled-module" and _same_weights(loaded.model, mlp)


class _Hostile:
    """Unpickling this calls open(path, "w"): it creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
