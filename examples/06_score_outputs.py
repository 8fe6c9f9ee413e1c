"""Score another tool's outputs without a model: POPE answers under several parsers, captions by CHAIR.

``halludec.benchmarks`` imports no torch, so this runs anywhere in a second. The files here are what any tool
(lmms-eval, VLMEvalKit, a paper's script) writes: one JSON object per line.

    python examples/06_score_outputs.py
    python examples/06_score_outputs.py --pope my_preds.jsonl --captions my_lab_captions.jsonl

The shell equivalents::

    halludec score --benchmark pope --predictions examples/data/other_tool_pope.jsonl --parser opera --json
    halludec score --benchmark lab-chair --predictions examples/data/other_tool_lab_captions.jsonl
    halludec score --benchmark chair --predictions caps.jsonl --annotations coco/annotations   # COCO captions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from halludec.benchmarks import list_parsers, score_predictions

DATA = Path(__file__).resolve().parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pope", default=str(DATA / "other_tool_pope.jsonl"), help="POPE predictions (JSONL)")
    parser.add_argument(
        "--captions", default=str(DATA / "other_tool_lab_captions.jsonl"), help="lab-scene captions (JSONL)"
    )
    args = parser.parse_args()

    # POPE: `answer` (free text), `label` (yes/no), optional `split`. The parser decides what counts as "yes":
    # e.g. "Yes, there is a cup. However, it is not clear ..." is yes for the official rule and no for OPERA's.
    print(f"POPE: {args.pope}")
    for name in list_parsers():
        record = score_predictions("pope", args.pope, parser=name)
        m = record["metrics"]
        print(
            f"  parser {name:<11} accuracy {m['accuracy']['value']:.3f}  f1 {m['f1']['value']:.3f}  "
            f"yes-ratio {m['yes_ratio']['value']:.3f}  unparseable {m['unparseable']['value']:.0f}"
        )

    # CHAIR over the lab vocabulary: `image_id` is the lab scene's seed, so the ground truth is regenerated from it.
    # (COCO CHAIR is the same call with benchmark "chair" and annotations="coco/annotations".)
    record = score_predictions("lab-chair", args.captions)
    m = record["metrics"]
    print(f"lab-CHAIR: {args.captions}")
    print(
        f"  CHAIR_s {m['chair_s']['value']:.3f}  CHAIR_i {m['chair_i']['value']:.3f}  recall {m['recall']['value']:.3f}"
        f"  (n {record['n_samples']})"
    )
    print(f"torch imported: {'torch' in sys.modules}")


if __name__ == "__main__":
    main()
