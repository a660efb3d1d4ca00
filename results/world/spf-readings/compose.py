"""A reading's run config: the experiment's stage-2 settings (results/world/config.json: 200 steps, batch 16,
lr 5e-4) for every SPF variant, the shared stage-1 artifact, and the reading's fields (readings/NAME.json).

    python compose.py readings/NAME.json STAGE1_ARTIFACT > RUN_CONFIG.json
"""

import json
import sys
from pathlib import Path

reading = json.loads(Path(sys.argv[1]).read_text())
experiment = json.loads(Path(__file__).resolve().parents[1].joinpath("config.json").read_text())
stage2 = {**experiment["all"], **experiment["spf"], "stage1_artifact": sys.argv[2], **reading}
print(json.dumps({"all": stage2}, indent=1))
