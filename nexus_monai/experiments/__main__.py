"""``python -m nexus_monai.experiments --evaluate-run SPEC.json``: the evaluation subprocess of one run (internal)."""

import sys

from nexus_monai.experiments import evaluate_run

if len(sys.argv) == 3 and sys.argv[1] == "--evaluate-run":
    sys.exit(evaluate_run(sys.argv[2]))
sys.exit("usage: python -m nexus_monai.experiments --evaluate-run SPEC.json (internal; use nexus-sr experiment)")
