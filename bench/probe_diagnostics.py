"""Why the hypercolumn probe gate (issue 4) scores what it does: three figures beside the gate.

- ``oracle_miou_at``: the best any per-cell classifier could do at a feature resolution. The
  true one-hot labels of the 500 test scenes are averaged over r×r cells and upsampled back to
  64×64 the way the probe upsamples its logits (bilinear); argmax. At 16×16, the backbone's
  highest feature resolution, this bounds a perfect probe.
- ``per_class_iou``: the gate's probe (100 few-shot scenes) per category, on the test scenes.
- ``probe_miou_by_train_images``: the same probe trained on more labelled scenes (100, 400):
  how much of the gap is too few examples rather than features that lack the class.

    python bench/probe_diagnostics.py [--backbone DIR] [--train 100,400]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=None, help="Backbone folder (default: the embedded one).")
    ap.add_argument("--train", default="100,400", help="Probe training set sizes (train split, seed 0).")
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torchmetrics.classification import MulticlassJaccardIndex

    from datasetdm.embedded import gates
    from datasetdm.backbone.loader import embedded_backbone_path, load_backbone
    from datasetdm.world.render import CATEGORIES

    torch.set_num_threads(args.threads)
    num_classes = gates.NUM_CLASSES["semantic"]
    names = ["background"] + [c.name for c in CATEGORIES]
    test = gates.render_set("test", gates.TEST_SEED, args.test)

    y = torch.from_numpy(test.semantic.astype(np.int64))
    valid = (y != gates.IGNORE_INDEX)[:, None]
    onehot = F.one_hot(y.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float() * valid
    oracle = {}
    for side in (32, 16, 8):
        cells = F.adaptive_avg_pool2d(onehot, side)
        up = F.interpolate(cells, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        oracle[str(side)] = round(gates.miou(up.numpy().astype(np.uint8), test.semantic, num_classes), 4)

    source = args.backbone or str(embedded_backbone_path())
    bb = load_backbone(source)
    f_test = gates.hypercolumn_features(bb, test.images, test.captions, attention=True)
    by_size, per_class = {}, {}
    for n in (int(x) for x in args.train.split(",")):
        train = gates.render_set("train", gates.PROBE_TRAIN_SEED, n)
        f_train = gates.hypercolumn_features(bb, train.images, train.captions, attention=True)
        probe = gates.train_probe(f_train, train.semantic, num_classes)
        pred = gates.probe_predict(probe, f_test)
        metric = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=gates.IGNORE_INDEX, average=None)
        metric.update(torch.from_numpy(pred.astype(np.int64)), y)
        ious = metric.compute().tolist()
        by_size[str(n)] = round(float(np.mean(ious)), 4)
        if not per_class:  # the gate's own setting: the first size
            per_class = {name: round(v, 3) for name, v in zip(names, ious)}
    print(json.dumps({"bench": "probe_diagnostics", "backbone": source, "test_images": args.test,
                      "oracle_miou_at": oracle, "probe_miou_by_train_images": by_size,
                      "per_class_iou": per_class}), flush=True)


if __name__ == "__main__":
    main()
