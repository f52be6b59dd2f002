from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from patchcore.backbones import create_backbone, load_state_dict
from patchcore.backbones.efficientnet_lite import EfficientNetLite, packaged_weights_path
from patchcore.errors import PatchCoreError

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("variant", ["efficientnet_lite0", "efficientnet_lite1"])
def test_packaged_weights_classify_a_real_cat(variant):
    """The shipped weights are mapped right: the full classifier puts skimage's cat into a cat class."""
    from PIL import Image
    from skimage.data import chelsea

    model = EfficientNetLite(variant).eval()
    model.load_state_dict(load_state_dict(packaged_weights_path(variant)), strict=True)
    image = Image.fromarray(chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert top5[0] in IMAGENET_CATS
    assert len(IMAGENET_CATS & set(top5)) >= 2


def test_efficientnet_feature_info_and_partial_compute():
    backbone = create_backbone("efficientnet_lite0")
    assert [(i.channels, i.stride) for i in backbone.feature_info] == [(40, 8)]  # blocks.2, the default
    assert backbone.mean == (0.5, 0.5, 0.5)
    assert len(backbone.weights_sha256) == 64
    backbone = create_backbone("efficientnet_lite0", ("blocks.2", "blocks.3"))
    assert [(i.channels, i.stride) for i in backbone.feature_info] == [(40, 8), (80, 16)]
    maps = backbone(torch.zeros(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 8, 8), (2, 80, 4, 4)]


def test_cpu_batches_run_in_slices_with_the_same_maps(monkeypatch):
    """A batch bigger than one slice is cut into slices on the CPU; the maps equal the one-pass result."""
    import patchcore.backbones as backbones

    backbone = create_backbone("efficientnet_lite0")
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    calls = []
    run = backbone._run
    backbone._run = lambda body, batch: calls.append(len(batch)) or run(body, batch)
    whole = backbone(x)
    assert calls == [5]
    monkeypatch.setattr(backbones, "CPU_PIXELS_PER_SLICE", 2 * 64 * 64)
    calls.clear()
    sliced = backbone(x)
    assert calls == [2, 2, 1]
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # conv kernels differ per batch size


def test_efficientnet_bad_layer_names_the_valid_ones():
    with pytest.raises(PatchCoreError, match="blocks.0 ... blocks.6"):
        create_backbone("efficientnet_lite0", ["layer2"])


def test_unknown_backbone():
    with pytest.raises(PatchCoreError, match="unknown backbone"):
        create_backbone("alexnet9000")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_backbone_from_local_weights_file(tmp_path: Path, suffix):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = create_backbone("resnet18", weights=path)
    x = torch.randn(1, 3, 64, 64)
    layer2, layer3 = backbone(x)
    with torch.no_grad():
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected2 = reference.layer2(reference.layer1(h))
        expected3 = reference.layer3(expected2)
    torch.testing.assert_close(layer2, expected2)
    torch.testing.assert_close(layer3, expected3)
    assert [(i.channels, i.stride) for i in backbone.feature_info] == [(128, 8), (256, 16)]
    # only the layers needed are computed: layer4 and the classifier are pruned away
    names = {name for name, _ in backbone.body.named_modules()}
    assert not any(n.startswith(("layer4", "fc")) for n in names)


def test_torchvision_backbone_without_torchvision_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # what an install without the extra looks like
    with pytest.raises(PatchCoreError, match=r"pip install 'patchcore\[torchvision\]'"):
        create_backbone("resnet18", weights="random")
    assert create_backbone("efficientnet_lite0").name == "efficientnet_lite0"  # the default needs torch alone


def test_torchvision_offline_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PatchCoreError, match="--weights FILE"):
        create_backbone("wide_resnet50_2")


def test_torchvision_uses_the_torch_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    entry = torchvision.models.get_model_weights("resnet18").DEFAULT
    cached = tmp_path / "hub" / "checkpoints" / Path(entry.url).name
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cached)
    backbone = create_backbone("resnet18")
    assert backbone.weights_sha256 != "random"


def test_weights_of_another_architecture_are_refused(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(PatchCoreError, match="does not fit"):
        create_backbone("resnet50", weights=path)
    with pytest.raises(PatchCoreError, match="does not fit"):
        create_backbone("efficientnet_lite0", weights=path)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PatchCoreError, match="cannot read weights file"):
        create_backbone("resnet18", weights=path)


def test_timm_backbone_by_name(tmp_path):
    timm = pytest.importorskip("timm")
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_timm.pth"
    torch.save(full.state_dict(), path)
    backbone = create_backbone("timm:resnet18", ["layer2", "layer3"], weights=path)
    assert [(i.channels, i.stride) for i in backbone.feature_info] == [(128, 8), (256, 16)]
    with pytest.raises(PatchCoreError, match="no feature layer"):
        create_backbone("timm:resnet18", ["nope"], weights="random")


def test_folded_batchnorm_computes_the_same_features():
    model = EfficientNetLite("efficientnet_lite0").eval()
    model.load_state_dict(load_state_dict(packaged_weights_path("efficientnet_lite0")))
    x = torch.randn(2, 3, 67, 67)  # odd size: asymmetric SAME padding on the stride-2 convs
    with torch.no_grad():
        expected = model.stages(x, [2, 4])
        folded = model.fold_batchnorm().stages(x, [2, 4])
    for a, b in zip(expected, folded):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kernel,stride,dilation,size",
    [
        (3, 2, 1, (16, 16)),
        (3, 2, 1, (15, 15)),
        (5, 2, 1, (16, 17)),
        (5, 2, 1, (17, 16)),
        (3, 1, 1, (10, 9)),
        (4, 1, 1, (9, 10)),
        (1, 2, 1, (8, 8)),
        (3, 2, 2, (16, 15)),
    ],
)
def test_same_padding_matches_tensorflow_padding_by_copy(kernel, stride, dilation, size):
    """The zero-tap trick gives what padding a copy of the input TF-style (extra at bottom/right) gives,
    per axis (non-square inputs pad each axis differently); dilated convs take the copy path."""
    import math

    import torch.nn.functional as F

    from patchcore.backbones.efficientnet_lite import SameConv2d

    conv = SameConv2d(4, 4, kernel, stride, dilation=dilation, groups=4, bias=False)
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(kernel + sum(size)))
    pads = []
    for n in reversed(size):  # F.pad wants (left, right, top, bottom)
        total = max((math.ceil(n / stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    expected = F.conv2d(F.pad(x, pads), conv.weight, None, stride, 0, dilation, 4)
    with torch.no_grad():
        got = conv(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
