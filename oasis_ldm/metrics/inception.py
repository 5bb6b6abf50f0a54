"""Inception-v3 pool features (2048-d) for FID and KID, from a local weights file.

Nothing is downloaded: `load_inception` takes a file the user fetched once, in either of
two formats, told apart by the classifier shape in the state dict:

- ``"pytorch-fid"``: ``pt_inception-2015-12-05-6726825d.pth``, the TensorFlow FID Inception
  ported by pytorch-fid (1008 classes, no aux head). Its Mixed_5*/6*/7b blocks average-pool
  without counting the zero padding (TensorFlow's behaviour) and Mixed_7c max-pools its pool
  branch; the FIDInception* blocks below reproduce that. Use it for numbers comparable with
  published FIDs.
- ``"torchvision"``: torchvision's ``inception_v3_google-0cc3c7bd.pth`` (1000 classes, with or
  without the ``AuxLogits`` head, which is dropped).

Preprocessing (both): greyscale -> 3 identical channels, bilinear resize to 299x299
(align_corners=False, as pytorch-fid) from [0, 1] images, then
- pytorch-fid: ``2x - 1``, the [-1, 1] input the TensorFlow graph was trained on;
- torchvision: ImageNet mean/std normalisation followed by torchvision's ``transform_input``
  remap, which torchvision switches on whenever it loads these (also TensorFlow-ported)
  weights. The two steps compose to ``2x - 1`` per channel as well.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.inception import InceptionA, InceptionC, InceptionE
from tqdm import tqdm

from oasis_ldm.metrics.image import as_unit

FORMATS = ("pytorch-fid", "torchvision")
_CLASSES = {1008: "pytorch-fid", 1000: "torchvision"}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_HINT = (
    "pass a local Inception-v3 weights file with --inception-weights "
    "(pytorch-fid pt_inception-2015-12-05-6726825d.pth, or torchvision inception_v3_google-0cc3c7bd.pth); "
    "nothing is downloaded"
)


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 average pool that, like TensorFlow, ignores the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """InceptionA with TensorFlow's average pooling."""

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionC(InceptionC):
    """InceptionC with TensorFlow's average pooling."""

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionE(InceptionE):
    """InceptionE with a choice of pool branch: TF average pool (Mixed_7b) or max pool (Mixed_7c)."""

    def __init__(self, in_channels: int, *, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def _fid_inception_v3() -> torchvision.models.Inception3:
    """torchvision's Inception-v3 skeleton with the FID Inception's classifier and blocks."""
    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return net


def _torchvision_inception_v3() -> torchvision.models.Inception3:
    return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)


class InceptionFeatures(nn.Module):
    """Greyscale images (any `as_unit` format) -> (B, 2048) float32 Inception pool features.

    Frozen and in eval mode. ``num_features`` lets torchmetrics' FID/KID metrics use it as
    their ``feature`` module without a probe forward.
    """

    num_features = 2048

    def __init__(self, weights_format: str = "pytorch-fid") -> None:
        super().__init__()
        if weights_format not in FORMATS:
            raise ValueError(f"unknown Inception weights format {weights_format!r}; expected one of {FORMATS}")
        self.weights_format = weights_format
        self.net = _fid_inception_v3() if weights_format == "pytorch-fid" else _torchvision_inception_v3()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in eval mode: batch-norm statistics must never move."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Images -> (B, 3, 299, 299) network input (see the module docstring)."""
        param = next(self.net.parameters())
        x = as_unit(images).to(device=param.device, dtype=param.dtype).expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if self.weights_format == "pytorch-fid":
            return 2 * x - 1
        mean = x.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std  # the ImageNet normalisation torchvision's transforms apply
        return x * (std / 0.5) + (mean - 0.5) / 0.5  # torchvision's transform_input for these weights

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        n = self.net
        x = self.preprocess(images)
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1):
            x = layer(x)
        for layer in (n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d):
            x = layer(x)
        for layer in (n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e):
            x = layer(x)
        for layer in (n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool):
            x = layer(x)
        return torch.flatten(x, 1).float()


def detect_weights_format(state_dict: dict[str, Tensor]) -> str:
    """Return "pytorch-fid" or "torchvision", from the classifier's class count (1008 vs 1000)."""
    fc = state_dict.get("fc.weight")
    if fc is None or "Mixed_7c.branch_pool.conv.weight" not in state_dict:
        raise ValueError("not an Inception-v3 state dict (no fc.weight / Mixed_7c keys)")
    if fc.shape[0] not in _CLASSES:
        raise ValueError(f"Inception-v3 classifier with {fc.shape[0]} classes; expected 1008 or 1000")
    return _CLASSES[fc.shape[0]]


def load_inception(weights_path: str | Path | None, device: torch.device | str | None = None) -> InceptionFeatures:
    """Build `InceptionFeatures` from a local weights file of either supported format.

    Raises FileNotFoundError (path missing or None) or ValueError (unusable file) with a
    one-line message that names the file and the ``--inception-weights`` flag.
    """
    if weights_path is None:
        raise FileNotFoundError(f"no Inception weights given: {WEIGHTS_HINT}")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}: {WEIGHTS_HINT}")
    try:
        state = _read_state_dict(path)
        model = InceptionFeatures(detect_weights_format(state))
        _load_exactly(model.net, state)
    except Exception as err:  # corrupt or foreign file: one line naming the file and the flag
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load Inception weights from {path} (--inception-weights): {reason}") from err
    return model.to(device) if device is not None else model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors only (weights_only), unwrapped from {"state_dict": ...}, without the aux head."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("AuxLogits.")}


def _load_exactly(net: nn.Module, state: dict[str, Tensor]) -> None:
    """load_state_dict that fails on any missing/unexpected key with a short message."""
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:2]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:2]})"
        )


def extract_features(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "inception features",
) -> Tensor:
    """Features of many images as one (N, D) float64 CPU tensor.

    ``images`` is either one tensor (split into ``batch_size`` chunks) or an iterable of
    batches (a DataLoader, a shard reader), each in any `as_unit` format. float64 because
    FID's covariances and KID's kernels are summed over thousands of rows.
    """
    if device is None:
        device = next(model.parameters()).device
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    total = -(-images.shape[0] // batch_size) if isinstance(images, Tensor) else None
    out = []
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
            out.append(model(batch.to(device)).double().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)
