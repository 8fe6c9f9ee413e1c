"""Run halludec strategies through EleutherAI's lm-evaluation-harness (``pip install 'halludec[lmeval]'``).

An in-memory model wrapped as lm-eval's ``halludec-vlm`` model type (``hf-multimodal`` plus a strategy around every
``generate``) is evaluated on halludec's shipped tasks: offline on the lab tasks by default, or on POPE / CHAIR with
your local data (``HALLUDEC_POPE_DIR``, ``HALLUDEC_COCO_DIR``). The shell route is ``halludec lm-eval`` (same
arguments as ``lm_eval``), printed at the end.

    python examples/08_lm_eval.py                                        # lab-POPE random split, none vs vcd
    python examples/08_lm_eval.py --tasks halludec_lab_chair --limit 20
    HALLUDEC_POPE_DIR=pope/output/coco python examples/08_lm_eval.py --model llava-hf/llava-1.5-7b-hf \
        --tasks halludec_pope --limit 500 --strategies none vhr
"""

from __future__ import annotations

import argparse

import lm_eval
from lm_eval.tasks import TaskManager

from halludec.cli import load_model
from halludec.integrations.lm_eval import HalludecVLM
from halludec.integrations.lm_eval_tasks import task_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="HF id, local folder, or lab (default)")
    parser.add_argument("--tasks", nargs="+", default=["halludec_lab_pope_random"])
    parser.add_argument("--strategies", nargs="+", default=["none", "vcd"])
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, processor = load_model(args.model)
    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)  # only halludec's tasks: fast
    for strategy in args.strategies:
        lm = HalludecVLM(pretrained=model, processor=processor, strategy=strategy, batch_size=args.batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=args.tasks, apply_chat_template=True, limit=args.limit, task_manager=manager
        )
        for task, metrics in out["results"].items():
            shown = ", ".join(
                f"{name.split(',')[0]} {value:.3f}"
                for name, value in metrics.items()
                if isinstance(value, float) and "stderr" not in name
            )
            print(f"{strategy:<6} {task}: {shown}")
    print(
        "shell: halludec lm-eval --model halludec-vlm --model_args pretrained=$(halludec lab-path),strategy=vcd "
        f"--tasks {','.join(args.tasks)} --apply_chat_template --limit {args.limit}"
    )


if __name__ == "__main__":
    main()
