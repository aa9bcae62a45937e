"""The model registry: shapes, published parameter counts, torchvision names, factories,
and the errors for what cannot be built."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from hessdiag.models import ModelInfo, build_model, list_models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model: nn.Module, in_shape, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(batch, *in_shape))


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn6_and_mlp_forward_on_every_claimed_input_shape(in_shape):
    for name in ("cnn6", "mlp"):
        model = build_model(name, num_classes=7, in_shape=in_shape)
        out = logits(model, in_shape)
        assert out.shape == (2, 7), (name, in_shape)
        assert torch.isfinite(out).all()


def test_cnn6_and_mlp_sizes_follow_the_architecture_and_kwargs():
    # 4 conv (32, 32, 64, 64) + Linear(64*8*8, 256) + Linear(256, 10) on 3x32x32
    assert n_params(build_model("cnn6")) == 1_116_970
    assert n_params(build_model("cnn6", in_shape=(1, 8, 8))) == 133_354
    assert 500_000 <= n_params(build_model("cnn6")) <= 1_200_000
    small = build_model("cnn6", in_shape=(1, 8, 8), width=4, hidden=8)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8] and len(linears) == 2
    assert linears[0].in_features == 8 * 2 * 2 and linears[0].out_features == 8
    mlp = build_model("mlp", in_shape=(1, 8, 8), num_classes=3, hidden=5)
    assert [(m.in_features, m.out_features) for m in mlp.modules()
            if isinstance(m, nn.Linear)] == [(64, 5), (5, 5), (5, 3)]


def test_resnet18_cifar_matches_the_published_count_and_runs():
    model = build_model("resnet18", num_classes=10)
    assert n_params(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert logits(model, (3, 32, 32)).shape == (2, 10)
    grey = build_model("resnet18", num_classes=4, in_shape=(1, 8, 8))
    assert grey.conv1.in_channels == 1 and logits(grey, (1, 8, 8)).shape == (2, 4)


def test_resnet50_cifar_matches_the_published_count_and_runs():
    model = build_model("resnet50", num_classes=10)
    assert n_params(model) == 23_520_842
    assert logits(model, (3, 32, 32), batch=1).shape == (1, 10)


def test_wrn28_10_matches_the_published_count():
    model = build_model("wrn28-10", num_classes=10)
    assert n_params(model) == 36_479_194
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
               for m in model.modules()) == 25  # stem + 2 per block, 4 blocks x 3 groups


def test_wrn_small_config_builds_runs_and_honours_dropout():
    model = build_model("wrn", depth=10, widen_factor=1, num_classes=5)
    assert logits(model, (3, 32, 32)).shape == (2, 5)
    assert logits(build_model("wrn", depth=10, widen_factor=2, in_shape=(1, 8, 8)),
                  (1, 8, 8)).shape == (2, 10)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    dropped = build_model("wrn", depth=10, widen_factor=1, dropout=0.3)
    assert {m.p for m in dropped.modules() if isinstance(m, nn.Dropout)} == {0.3}
    # eval mode switches dropout off: the outputs are a fixed function of the input
    assert torch.equal(logits(dropped, (3, 32, 32)), logits(dropped, (3, 32, 32)))
    # deeper and wider means more parameters
    assert n_params(build_model("wrn", depth=16, widen_factor=1)) > n_params(model)
    assert n_params(build_model("wrn", depth=10, widen_factor=2)) > n_params(model)


def test_torchvision_names_build_without_weights_or_network(no_network):
    vit = build_model("vit_b_16", num_classes=10, image_size=32)
    assert type(vit).__module__.startswith("torchvision.")
    assert vit.image_size == 32 and vit.heads.head.out_features == 10
    assert logits(vit, (3, 32, 32), batch=1).shape == (1, 10)
    mobile = build_model("mobilenet_v3_small", num_classes=3)
    assert logits(mobile, (3, 32, 32)).shape == (2, 3)


def test_torchvision_names_reject_what_would_fail_later():
    with pytest.raises(ValueError, match="3-channel images.*in_shape"):
        build_model("mobilenet_v3_small", in_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="never downloads weights"):
        build_model("mobilenet_v3_small", weights="DEFAULT")
    # (not mobilenet_v3: torchvision's MobileNetV3 silently ignores unknown kwargs)
    with pytest.raises(ValueError, match="squeezenet1_1.*bad keyword.*bogus"):
        build_model("squeezenet1_1", bogus=1)


def test_list_models_describes_ours_first_and_torchvision_without_duplicates():
    infos = list_models()
    assert all(isinstance(i, ModelInfo) for i in infos)
    names = [i.name for i in infos]
    assert names[:6] == ["mlp", "cnn6", "resnet18", "resnet50", "wrn28-10", "wrn"]
    assert len(names) == len(set(names))
    source = {i.name: i.source for i in infos}
    assert source["resnet18"] == "hessdiag" and source["vit_b_16"] == "torchvision"
    assert "1,116,970" in next(i.description for i in infos if i.name == "cnn6")
    with pytest.raises(AttributeError):
        infos[0].name = "other"  # frozen


FACTORY_SOURCE = textwrap.dedent("""
    from torch import nn

    def with_shape(num_classes, in_shape, hidden=3):
        c, h, w = in_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden),
                             nn.Linear(hidden, num_classes))

    def bare(width=2):
        return nn.Linear(width, width)

    def not_a_module(num_classes):
        return [num_classes]
""")


def test_file_factory_gets_num_classes_and_in_shape_only_when_it_names_them(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY_SOURCE)
    model = build_model(f"{path}:with_shape", num_classes=4, in_shape=(2, 3, 5), hidden=6)
    assert [(m.in_features, m.out_features) for m in model
            if isinstance(m, nn.Linear)] == [(30, 6), (6, 4)]
    assert logits(model, (2, 3, 5)).shape == (2, 4)
    bare = build_model(f"{path}:bare", num_classes=4, width=3)  # would reject num_classes
    assert isinstance(bare, nn.Linear) and bare.in_features == 3


def test_module_factory_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "hessdiag_test_model_factories.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hessdiag_test_model_factories", raising=False)
    model = build_model("hessdiag_test_model_factories:with_shape", num_classes=2,
                        in_shape=(1, 4, 4))
    assert logits(model, (1, 4, 4)).shape == (2, 2)
    sys.modules.pop("hessdiag_test_model_factories", None)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'foo'; known: mlp, cnn6, resnet18, "
                       r"resnet50, wrn28-10, wrn, transformer, gcn, tiny-lm and torchvision.s .*"
                       r"package\.module:factory "
                       r"or path/to/file\.py:factory"):
        build_model("foo")
    with pytest.raises(ValueError, match="model 'mlp' takes no argument 'depth'; it accepts: "
                       "hidden"):
        build_model("mlp", depth=3)
    with pytest.raises(ValueError, match="'resnet18' takes no argument 'width'; it accepts: no"):
        build_model("resnet18", width=2)
    with pytest.raises(ValueError, match="'wrn28-10' takes no argument 'depth'"):
        build_model("wrn28-10", depth=10)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        build_model("wrn", depth=12, widen_factor=1)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        build_model("wrn", depth=10, widen_factor=1, dropout=1.5)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        build_model("mlp", hidden=0)
    with pytest.raises(ValueError, match="cnn6.*at least 4x4"):
        build_model("cnn6", in_shape=(1, 3, 3))
    with pytest.raises(ValueError, match=r"takes images \(channels, height, width\)"):
        build_model("cnn6", in_shape=(8, 8))
    with pytest.raises(ValueError, match="in_shape must be positive integers"):
        build_model("mlp", in_shape=(8, 0))
    assert build_model("mlp", in_shape=(5,), num_outputs=1)(torch.randn(3, 5)).shape == (3, 1)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        build_model("mlp", num_classes=0)

    path = tmp_path / "factories.py"
    path.write_text(FACTORY_SOURCE)
    with pytest.raises(ValueError, match="returned a list, not a torch.nn.Module"):
        build_model(f"{path}:not_a_module", num_classes=3)
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        build_model(f"{path}:missing")
    with pytest.raises(ValueError, match="does not exist"):
        build_model(f"{tmp_path / 'nowhere.py'}:f")
    with pytest.raises(ValueError, match="cannot import module"):
        build_model("hessdiag_no_such_module_xyz:f")
    with pytest.raises(ValueError, match="cannot call the factory.*unexpected keyword.*colour"):
        build_model(f"{path}:bare", colour="red")
