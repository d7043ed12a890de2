"""dmm's Inception FID path against the reference implementations, on the same pictures and the same weights.

torch-fidelity (which reproduces TensorFlow's original FID to within float error) is the reference; torchmetrics'
FrechetInceptionDistance is shown with its default resize (antialiased since torchmetrics 1.8) and with the
reference resize, and dmm's previous path (PIL bicubic to 299 px first) for comparison. Weights: the real FID
weights when given (--weights), else a seeded random Inception (the comparison is of the computation, and needs
no download). Needs torch-fidelity (pip install 'dmm-cli[inception]').

  python benchmarks/inception_check.py --work /tmp/inception-check [--weights pt_inception-2015-12-05-6726825d.pth]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmm_cli.eval.features import inception_space  # noqa: E402
from dmm_cli.eval.fid import fid  # noqa: E402


def pictures(folder: Path, n: int, size: int, seed: int, lines: int) -> list[Path]:
    """Smooth colour fields with sharp strokes and grain: resizing them 512 → 299 px aliases, as photos do."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        field = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(field)
        for _ in range(lines):
            xy = [tuple(rng.integers(0, size, 2)) for _ in range(2)]
            draw.line([*xy[0], *xy[1]], fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
        grain = rng.normal(0, 12, (size, size, 3))
        image = Image.fromarray(np.clip(np.asarray(field, np.float64) + grain, 0, 255).astype(np.uint8))
        paths.append(folder / f"{k:04d}.png")
        image.save(paths[-1])
    return paths


def random_weights(path: Path, seed: int, calibration: list[Path]) -> Path:
    """A seeded random Inception whose batch-norm statistics are measured on `calibration` pictures, so that its
    features spread like a trained network's instead of collapsing to a constant."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    torch.manual_seed(seed)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the calibration batch
        bn.train()
    with torch.no_grad():
        net(torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                         for p in calibration]))
    torch.save(net.state_dict(), path)
    return path


def torchmetrics_fid(a: list[Path], b: list[Path], weights: Path, **kwargs) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights), **kwargs)
    for paths, real in ((a, True), (b, False)):
        metric.update(torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                                   for p in paths]), real=real)
    return float(metric.compute())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--weights", type=Path, help="the FID Inception weights (default: a seeded random Inception)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    a = p.parse_args()
    import torch_fidelity

    a.work.mkdir(parents=True, exist_ok=True)
    set_a = pictures(a.work / "a", a.images, a.size, 1, 6)
    set_b = pictures(a.work / "b", a.images, a.size, 2, 12)
    calibration = pictures(a.work / "calibration", 16, a.size, 3, 9)
    weights = a.weights or random_weights(a.work / "random-inception.pth", 0, calibration)

    space = inception_space(str(weights), torch.device("cpu"))
    features = [space.extract([Image.open(p) for p in paths]) for paths in (set_a, set_b)]
    dmm_fid = fid(*features)
    reference = torch_fidelity.calculate_metrics(input1=str(a.work / "a"), input2=str(a.work / "b"), fid=True,
                                                 cuda=False, verbose=False, feature_extractor="inception-v3-compat",
                                                 feature_extractor_weights_path=str(weights))["frechet_inception_distance"]
    bicubic = space.extract  # dmm before: PIL bicubic to 299 px, then the network
    old = [bicubic([Image.open(p).convert("RGB").resize((299, 299), Image.BICUBIC) for p in paths])
           for paths in (set_a, set_b)]
    result = {
        "weights": "given" if a.weights else "seeded random Inception",
        "images_per_set": a.images, "size": a.size,
        "torch_fidelity": reference,
        "dmm": dmm_fid,
        "dmm_relative_difference": abs(dmm_fid - reference) / reference,
        "torchmetrics_default": torchmetrics_fid(set_a, set_b, weights),
        "torchmetrics_reference_resize": torchmetrics_fid(set_a, set_b, weights, antialias=False),
        "dmm_before_pil_bicubic": fid(*old),
    }
    for key in ("torchmetrics_default", "torchmetrics_reference_resize", "dmm_before_pil_bicubic"):
        result[f"{key}_relative_difference"] = abs(result[key] - reference) / reference
    (a.work / "inception_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
