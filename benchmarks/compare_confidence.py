"""Per-method confidence diagnosis from a compare output folder: mean top-class confidence vs accuracy of the
ensemble and of each member (test split, seed 0), and the validation ECE/NLL of every tuning trial."""
import json, os, sys, glob
from safetensors.torch import load_file
out = sys.argv[1]
rows = {}
for method in sorted(os.listdir(out)):
    d = os.path.join(out, method, "seed0", "test_outputs.safetensors")
    if not os.path.isfile(d):
        continue
    t = load_file(d)
    z, y = t["member_logits"].double(), t["labels"]
    p_m = z.softmax(-1)                       # (M, N, C)
    p = p_m.mean(0)
    conf, pred = p.max(-1)
    mconf, mpred = p_m.max(-1)
    rows[method] = {"ensemble_conf": float(conf.mean()), "ensemble_acc": float((pred == y).double().mean()),
                    "member_conf": [round(float(c.mean()), 3) for c in mconf],
                    "member_acc": [round(float((mp == y).double().mean()), 3) for mp in mpred]}
trials = {}
for f in sorted(glob.glob(os.path.join(out, "tuning", "*", "trial*", "results.json"))):
    r = json.load(open(f))
    cfg = open(os.path.join(os.path.dirname(f), "run_config.yaml")).read()
    method, trial = f.split(os.sep)[-3], f.split(os.sep)[-2]
    v = r.get("val_metrics", {})
    trials[f"{method}/{trial}"] = {"val/nll": v.get("val/nll"), "val/ece": v.get("val/ece"), "val/acc": v.get("val/acc"),
                                    "epochs_run": r.get("epochs_run"), "best_epoch": r.get("best_epoch"),
                                    "val_nll_history": r.get("val_nll_history")}
print(json.dumps({"test_seed0": rows, "trials": trials}, indent=1))
