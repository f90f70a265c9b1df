"""Dev tool (session 28; not product code): train only the joint ("finetune") model of a semantic
downstream run, through run_downstream's own functions, and store it in the cache under the key
run_downstream computes, so the bench finds it. Used to train one setting's joint model in
parallel with its synthetic-only model. --check-only: print the key, train nothing."""
import sys
from pathlib import Path

import torch
from datasetdm.evaluation import downstream as d
from datasetdm.formats.labelled_folder import read_labelled_folder
from datasetdm.io import write_json_atomic

real, synthetic, cache = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
check_only = "--check-only" in sys.argv
config = d.DownstreamConfig()
test_images, test_masks, categories = d.world_test_set(1, 500)
num_classes = max(c.id for c in categories) + 1
ids = [c.id for c in categories]
real_x, real_y = d.load_semantic(read_labelled_folder(real), categories, "real")
syn_x, syn_y = d.load_semantic(read_labelled_folder(synthetic), categories, "synthetic")
scored_on = d._digest(test_images, test_masks, extra={"ids": ids, "config": d._recipe_key(config, "segmenter"),
                                                       "version": 1})
key = d._digest(real_x, real_y, syn_x, syn_y, extra={"scored_on": scored_on, "joint": "finetune"})
path = cache / f"segmenter-{key}.json"
print(key, path.exists(), flush=True)
if check_only or path.exists():
    sys.exit(0)
model = d._fine_tuned(lambda x, y, cfg, **kw: d._train(x, y, num_classes, cfg, **kw), (syn_x, syn_y),
                      (real_x, real_y), config, None, d.joint_recipe("finetune").real_share)
metrics = d.evaluate_segmenter(model, test_images, test_masks, ids)
write_json_atomic(path, {"images": int(len(real_x) + len(syn_x)), **metrics, "torch_threads": torch.get_num_threads()})
print("done", metrics["miou"], flush=True)
