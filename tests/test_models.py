"""Model zoo: every registered model builds for 1 and 3 input channels and maps a batch to
(B, num_classes); parameter counts are pinned, and the CIFAR ResNets / MobileNetV2 are checked
against torchvision's counts (same layers but the stem); torchvision:NAME never downloads."""
import re

import pytest
import torch
import torchvision
from torch import nn

from elastictrain.models import MODELS, build_model, constrainable, list_models

# num_classes=10, in_channels=3. VGG16 is the value the seed's specs were written against; ResNet20
# is within 1% of the paper's 0.27M (option-B shortcuts add 2,752 to the usual 269,722).
EXPECTED_PARAMS = {
    "vgg11": 9_231_114, "vgg13": 9_416_010, "vgg16": 14_728_266, "vgg19": 20_040_522,
    "resnet20": 272_474, "resnet32": 466_906, "resnet56": 855_770,
    "resnet18": 11_173_962, "resnet34": 21_282_122, "resnet50": 23_520_842,
    "resnet101": 42_512_970, "resnet152": 58_156_618,
    "mobilenetv2": 2_236_682, "lenet5": 62_006, "convnet": 242_474, "smallcnn": 826666,
    "vggcpu": 981_802,
}
HEAVY = {"resnet101", "resnet152"}  # only one 28×28 image forward: a full sweep costs seconds each
NEEDS_32 = {"vgg11", "vgg13", "vgg16", "vgg19"}  # five 2×2 max-pools: 28×28 pools to nothing


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(build):
    """Build without allocating or initialising storage: counting parameters needs shapes only."""
    with torch.device("meta"):
        return build()


def test_every_registered_model_has_a_pinned_count():
    assert list_models() == sorted(EXPECTED_PARAMS) == sorted(MODELS)


@pytest.mark.parametrize("name", list_models())
def test_parameter_count(name):
    assert n_params(on_meta(lambda: build_model(name, num_classes=10, in_channels=3))) == EXPECTED_PARAMS[name]


def test_resnet20_near_paper():
    assert abs(EXPECTED_PARAMS["resnet20"] - 272_474) <= 0.05 * 272_474
    assert round(EXPECTED_PARAMS["resnet18"] / 1e6, 2) == 11.17


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_cifar_resnet_is_torchvision_but_the_stem(name):
    ours = n_params(on_meta(lambda: build_model(name)))
    theirs = n_params(on_meta(lambda: torchvision.models.get_model(name, weights=None, num_classes=10)))
    assert ours == theirs - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3  # 7×7 stem -> 3×3 stem


def test_mobilenetv2_matches_torchvision_and_keeps_4x4():
    theirs = torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=10)
    assert n_params(build_model("mobilenetv2")) == n_params(theirs)
    model = build_model("mobilenetv2").eval()
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 32, 32)).shape == (1, 1280, 4, 4)  # stride 8, not 32


@pytest.mark.parametrize("name, depth", [("resnet20", 20), ("resnet32", 32), ("resnet56", 56),
                                         ("resnet18", 18), ("resnet34", 34), ("resnet50", 50)])
def test_resnet_depth(name, depth):
    """Weighted layers on the main path (shortcut projections excluded) are the name's depth."""
    layers = [n for n, m in build_model(name).named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in n]
    assert len(layers) == depth


def sizes(name):
    return (32,) if name in NEEDS_32 else (28, 32)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", sorted(set(list_models()) - HEAVY))
def test_forward_shape(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels)
    with torch.no_grad():
        for hw in sizes(name):
            y = model(torch.randn(2, in_channels, hw, hw))
            assert y.shape == (2, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_forward_shape_heavy(name):
    model = build_model(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 7)


def test_convnet_is_small():
    model = build_model("convnet", num_classes=10, in_channels=1)
    assert 150_000 <= n_params(model) <= 300_000
    assert list(constrainable(model)) == ["features.0.weight", "features.3.weight", "features.7.weight",
                                          "features.11.weight", "classifier.weight"]


def test_vggcpu_is_conv_dominated():
    """The CPU tier's model for kernel, pattern and balanced rows: ≥ 90% and ≥ 0.5 M of its weights in
    3×3 convs, each followed by BatchNorm."""
    model = build_model("vggcpu", num_classes=10, in_channels=1)
    weights = constrainable(model)
    conv = {n: w for n, w in weights.items() if w.dim() == 4}
    total = sum(w.numel() for w in weights.values())
    assert sum(w.numel() for w in conv.values()) >= max(500_000, 0.9 * total)
    assert {tuple(w.shape[2:]) for w in conv.values()} == {(3, 3)}
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert all(isinstance(layers[i + 1], nn.BatchNorm2d) for i in convs) and len(convs) == len(conv)


@pytest.mark.parametrize("name", list_models())
def test_constrainable_are_the_conv_and_linear_weights(name):
    model = build_model(name, num_classes=7, in_channels=1)
    weights = constrainable(model)
    params = dict(model.named_parameters())
    assert all(params[k] is w for k, w in weights.items())
    assert {w.dim() for w in weights.values()} == {2, 4}
    assert len(weights) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def test_vgg16_names_unchanged():
    names = list(constrainable(build_model("vgg16")))
    assert len(names) == 14 and names[0] == "features.0.weight" and names[-1] == "classifier.weight"
    assert names[1] == "features.3.weight"  # conv, BN, ReLU per layer


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model build tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_torchvision_resnet18_one_channel(no_downloads):
    model = build_model("torchvision:resnet18", num_classes=7, in_channels=1)
    conv = model.conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias) == \
        (1, 64, (7, 7), (2, 2), (3, 3), None)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_torchvision_first_conv_inside_sequential(no_downloads):
    model = build_model("torchvision:mobilenet_v3_small", num_classes=7, in_channels=1)
    assert model.features[0][0].in_channels == 1 and model.features[0][0].stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_three_channels_untouched(no_downloads):
    assert build_model("torchvision:resnet18", num_classes=7).conv1.in_channels == 3


def test_unknown_model():
    msg = ("model: unknown model 'resnet21' (expected one of " + ", ".join(list_models())
           + ", or torchvision:NAME)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        build_model("resnet21")
    with pytest.raises(ValueError, match=r"^model: unknown torchvision model 'fasterrcnn_resnet50_fpn'"):
        build_model("torchvision:fasterrcnn_resnet50_fpn")  # a detector, not a classifier


@pytest.mark.parametrize("field, kwargs", [("num_classes", {"num_classes": 0}), ("in_channels", {"in_channels": 0})])
def test_bad_sizes_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"^model\.{field}: must be a positive integer"):
        build_model("convnet", **kwargs)


def test_dry_forward_names_the_failing_layer_and_keeps_the_mode():
    from elastictrain.config import ConfigError
    from elastictrain.models.fit import dry_forward

    model = build_model("vgg16", 10, 1).train()
    with pytest.raises(ConfigError, match=r"^m: input 1×28×28 does not fit the model \(at features\.\d+, MaxPool2d: "):
        dry_forward(model, torch.zeros(2, 1, 28, 28), "m")
    assert model.training  # restored after the failure …
    assert dry_forward(model, torch.zeros(2, 1, 32, 32), "m").shape == (2, 10)
    assert model.training  # … and after a forward in eval mode
