"""Model registry and architectures: shapes, the exact CAM identity, budgets, teacher parity, ONNX."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from models import (ModelConfig, UnknownModelError, count_macs, count_params, create_model,  # noqa: E402
                    list_models, load_state_dict_file, model_config, register_model)
from tests.conftest import need_shared  # noqa: E402

ALL_MODELS = ("densenet121", "densenet161", "resnet50", "vit_small_patch16",
              "eeea_c2", "mobilenetv3_large", "mobilenetv3_small", "efficientnet_b0", "resnet18")
SMALL = 64  # px: every CNN reaches a 2 x 2 feature grid; the ViT is built for it via img_size


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def _build(name: str, **kw) -> nn.Module:
    if name.startswith("vit"):
        kw.setdefault("img_size", SMALL)
    return create_model(name, **kw).eval()


def test_registry_lists_every_model_by_family():
    # other test modules may register tiny test models: check the built-ins are all there, by family
    assert set(ALL_MODELS) <= set(list_models())
    assert list_models("teacher") == sorted(["densenet121", "densenet161", "resnet50", "vit_small_patch16",
                                             "efficientnet_lite1", "efficientnet_lite2"])
    assert {"eeea_c2", "mobilenetv3_large", "mobilenetv3_small", "efficientnet_b0", "resnet18",
            "efficientnet_lite0"} <= set(
        list_models("student"))
    with pytest.raises(ValueError, match="family"):
        list_models("teachers")


def test_unknown_model_is_a_clear_key_and_value_error():
    with pytest.raises(KeyError) as exc:
        create_model("densenet_121")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, UnknownModelError)
    assert "densenet_121" in str(exc.value) and "densenet121" in str(exc.value)
    with pytest.raises(KeyError):
        model_config("nope")


def test_bad_constructor_arguments_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mobilenetv3_small", num_classes=0)
    with pytest.raises(ValueError, match="in_chans"):
        create_model("mobilenetv3_small", in_chans=0)


def test_register_model_rejects_duplicates_and_bad_family():
    cfg = model_config("resnet18")
    with pytest.raises(ValueError, match="already registered"):
        register_model(cfg)(lambda num_classes, in_chans: None)
    with pytest.raises(ValueError, match="family"):
        register_model(ModelConfig("x", "pupil", 224, 8, "", ""))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_contract_shapes_and_exact_cam_identity(name):
    cfg = model_config(name)
    assert cfg.name == name and cfg.reference and cfg.default_input_size == 224
    model = _build(name, num_classes=5)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 5
    x = torch.randn(2, 1, SMALL, SMALL)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.ndim == 4 and feats.shape[:2] == (2, cfg.feature_channels)
    assert feats.shape[2:] == ((SMALL // 16,) * 2 if name.startswith("vit") else (SMALL // 32,) * 2)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    W, b = model.classifier.weight, model.classifier.bias
    cam_logits = feats.mean((2, 3)) @ W.T + b
    torch.testing.assert_close(logits, cam_logits, rtol=1e-5, atol=1e-5)
    # The same identity per class, as a CAM: mean over pixels of W[c] . features == logit - b.
    cam = torch.einsum("kc,nchw->nkhw", W, feats)
    torch.testing.assert_close(cam.mean((2, 3)) + b, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_three_channel_input_and_training_step(name):
    model = _build(name, num_classes=3, in_chans=3, drop_rate=0.5).train()
    x = torch.randn(2, 3, SMALL, SMALL)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_dropout_only_in_training():
    model = _build("mobilenetv3_small", drop_rate=0.9)
    x = torch.randn(4, 1, SMALL, SMALL)
    model.classifier.weight.data.normal_()
    with torch.no_grad():
        feats = model.features(x)
        model.train()
        torch.manual_seed(1)
        train_logits = model.head(feats)
        model.eval()
        eval_logits = model.head(feats)
    assert not torch.allclose(train_logits, eval_logits)
    torch.testing.assert_close(eval_logits, feats.mean((2, 3)) @ model.classifier.weight.T + model.classifier.bias)


def test_vit_full_size_grid_and_position_interpolation():
    model = create_model("vit_small_patch16", depth=2).eval()  # full width, shallow: shape test only
    with torch.no_grad():
        assert model.features(torch.randn(1, 1, 224, 224)).shape == (1, 384, 14, 14)
        assert model(torch.randn(1, 1, 160, 160)).shape == (1, 14)  # 10 x 10 grid, interpolated positions
    with pytest.raises(ValueError, match="multiple"):
        create_model("vit_small_patch16", img_size=100)


def test_count_macs_matches_hand_count():
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    assert count_macs(net, 16) == 16 * 16 * 8 * 9 + 16 * 16 * 8 * 9 + 8 * 16 * 16 * 10
    assert count_params(net) == sum(p.numel() for p in net.parameters())


def test_eeea_c2_budget_and_student_sizes():
    eeea = create_model("eeea_c2")
    assert 4.0e6 <= count_params(eeea) <= 5.5e6
    assert 0.2e9 <= count_macs(eeea, 224) <= 0.4e9
    with torch.no_grad():
        assert eeea.eval().features(torch.randn(1, 1, 224, 224)).shape == (1, 1280, 7, 7)
    dws = [m for m in eeea.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert {m.kernel_size[0] for m in dws} == {3, 5, 7}  # the mixed-kernel search space
    assert 6.8e6 <= count_params(create_model("densenet121")) <= 7.1e6  # ~7.0 M with 14 outputs


def test_load_state_dict_file_casts_fp16_and_unwraps(tmp_path):
    src = create_model("mobilenetv3_small")
    for p in src.parameters():
        p.data.normal_()
    half = {f"module.{k}": v.half() for k, v in src.state_dict().items()}
    path = tmp_path / "w.fp16.pt"
    torch.save({"state_dict": half}, path)
    dst = load_state_dict_file(create_model("mobilenetv3_small"), path)
    for k, v in dst.state_dict().items():
        assert v.dtype == src.state_dict()[k].dtype, k
        torch.testing.assert_close(v.float(), src.state_dict()[k].half().float())
    torch.save({"bogus.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError):
        load_state_dict_file(create_model("mobilenetv3_small"), path)


def _export_and_compare(model: nn.Module, path, size: int = 224) -> None:
    ort = pytest.importorskip("onnxruntime")

    class WithFeatures(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            f = self.m.features(x)
            return self.m.head(f), f

    wrapper = WithFeatures(model.eval()).eval()
    x = torch.randn(2, 1, size, size)
    torch.onnx.export(wrapper, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["logits", "features"], dynamic_axes={"image": {0: "N"}})
    import onnx
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops <= {"Conv", "Relu", "HardSwish", "HardSigmoid", "Mul", "Add", "ReduceMean", "Gemm", "Identity"}, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 1, size, size)
    logits, feats = sess.run(["logits", "features"], {"image": y.numpy()})
    with torch.no_grad():
        ref_logits, ref_feats = wrapper(y)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(feats, ref_feats.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is what we want here
@pytest.mark.parametrize("name", ["eeea_c2", "mobilenetv3_large"])
def test_student_exports_to_onnx_and_matches(name, tmp_path):
    model = create_model(name)
    with torch.no_grad():  # non-trivial BN statistics so the comparison means something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.classifier.weight.normal_(std=0.05)
    _export_and_compare(model, tmp_path / f"{name}.onnx")


def _read_gray(path) -> np.ndarray:
    try:
        from cxr_edge.imaging import read_image
        return read_image(path).pixels
    except ImportError:  # imaging not ready: 8-bit PNG / 255 is what the teacher was trained on
        import cv2
        return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0


def test_densenet121_teacher_loads_strict_and_matches_shared_onnx():
    ort = pytest.importorskip("onnxruntime")
    weights = need_shared("teachers", "densenet121-nih1071.fp16.pt")
    onnx_path = need_shared("teachers", "densenet121-nih1071.onnx")
    images = sorted(need_shared("data", "nih-cxr14-sample", "images").glob("*.png"))[:4]
    from cxr_edge.manifest import PreprocessSpec
    from cxr_edge.preprocess import preprocess

    model = load_state_dict_file(create_model("densenet121"), weights).eval()
    assert model.features.conv0.weight.dtype == torch.float32
    spec = PreprocessSpec(input_size=(224, 224), resize="area", mean=(0.49465,), std=(0.25223,))
    x = preprocess([_read_gray(p) for p in images], spec)
    ref_logits, ref_feats = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        ["logits", "features"], {"image": x})
    with torch.no_grad():
        feats = model.features(torch.from_numpy(x))
        logits = model.head(feats)
    assert feats.shape == (len(images), 1024, 7, 7) and float(feats.min()) >= 0.0  # after relu(norm5)
    np.testing.assert_allclose(logits.numpy(), ref_logits, atol=1e-3)
    np.testing.assert_allclose(feats.numpy(), ref_feats, atol=1e-3)
