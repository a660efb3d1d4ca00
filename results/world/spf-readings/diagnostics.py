"""Stage-2 diagnostics of one reading's run (trainers/spf_diagnostics.py, docs/spf.md section 6), per SPF
variant: the mean of each logged number over the first and the last quarter of the logged steps.

    python diagnostics.py RUN > diagnostics.json
"""

import json
import sys
from pathlib import Path

KEYS = ("loss_diffusion", "loss_enhanced", "loss_text", "loss_fine", "loss_total", "diag_hidden_rel",
        "diag_eps_base_rel", "m_mean", "m_q90", "m_hat_mean", "m_hat_q90", "diag_m_auc", "diag_m_iou",
        "diag_m_hat_auc", "diag_m_hat_iou")


def window(rows, key, part):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    q = max(1, len(vals) // 4)
    chunk = vals[:q] if part == "first" else vals[-q:]
    return sum(chunk) / len(chunk)


out = {}
for log in sorted(Path(sys.argv[1]).glob("methods/*/train/log.jsonl")):
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    out[log.parents[1].name] = {part: {k: v for k in KEYS if (v := window(rows, k, part)) is not None}
                                for part in ("first", "last")}
print(json.dumps(out, indent=1))
