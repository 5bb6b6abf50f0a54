"""Tables of the demo-quality runs under runs/quality/ (inbrain.json of vae runs, stats.json of ldm runs)."""

import json
import sys
from pathlib import Path

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quality")
print("| run | overrides | in-brain SSIM (same set / other set) | in-brain PSNR | whole SSIM | whole PSNR |")
print("|---|---|---|---|---|---|")
for f in sorted(runs.glob("*/inbrain.json"), key=lambda p: p.stat().st_mtime):
    lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    evals = [x for x in lines if "ssim_in" in x]
    meta = next((x for x in lines if "name" in x), {})
    if not evals:
        continue
    a = evals[0]
    b = evals[1] if len(evals) > 1 else {}
    print(
        f"| {f.parent.name} | {meta.get('sets', '')} | {a['ssim_in']:.3f} / {b.get('ssim_in', float('nan')):.3f} "
        f"| {a['psnr_in']:.1f} | {a['ssim']:.3f} | {a['psnr']:.1f} |"
    )
print()
print("| ldm run | vae | overrides | nn_ssim | hist_w1 | grad_ratio | wm_gm_gap (real) |")
print("|---|---|---|---|---|---|---|")
for f in sorted(runs.glob("*/stats.json"), key=lambda p: p.stat().st_mtime):
    lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    s = next((x for x in lines if "nn_ssim" in x), None)
    meta = next((x for x in lines if "name" in x), {})
    if s:
        print(
            f"| {f.parent.name} | {meta.get('vae', '')} | {meta.get('sets', '')} | {s['nn_ssim']:.3f} | {s['hist_w1']} "
            f"| {s['grad_ratio']} | {s['wm_gm_gap']} ({s['real_wm_gm_gap']}) |"
        )
