"""The ``lm-eval`` and ``lm-eval-tasks`` subcommands of the ``halludec`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

LM_EVAL_EPILOG = """examples:
  halludec lm-eval --model halludec-vlm --model_args pretrained=$(halludec lab-path),strategy=vcd,alpha=2.0 \\
      --tasks halludec_lab_pope_random --apply_chat_template --limit 20 --device cpu
  halludec lm-eval --model halludec-vlm --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=vhr \\
      --tasks halludec_pope_adversarial --apply_chat_template --batch_size 8 --include_path $(halludec lm-eval-tasks)
  halludec lm-eval ls tasks        lm-eval's own subcommands work too

The arguments are exactly lm_eval's (halludec lm-eval --help shows them); halludec registers the model type
halludec-vlm first and, when --include_path is not given, adds its own task folder.
"""


def _cmd_lm_eval(argv: Sequence[str]) -> int:
    try:
        from halludec.integrations.lm_eval import cli_main
    except ImportError as err:
        print(f"halludec: error: {err}", file=sys.stderr)
        return 2
    try:
        return cli_main(argv)
    except (KeyError, ValueError) as err:  # a bad strategy name or field in --model_args
        print(f"halludec: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2


def _cmd_lm_eval_tasks(args: argparse.Namespace) -> int:
    from halludec.integrations.lm_eval_tasks import task_dir, write_task_dir

    if args.out is None:
        if args.pope_dir or args.coco_dir:
            raise ValueError("--pope-dir / --coco-dir are written into a task folder: add --out DIR.")
        print(task_dir())
        return 0
    try:
        print(write_task_dir(args.out, pope_dir=args.pope_dir, coco_dir=args.coco_dir))
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    return 0


def add_lm_eval_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``lm-eval`` (listed for help; :func:`run_lm_eval_passthrough` runs it) and ``lm-eval-tasks``.

    Args:
        sub: The ``halludec`` command's subparsers.
    """
    p_lm = sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-eval's command line with the halludec-vlm model type and halludec's tasks (lm_eval's arguments)",
        epilog=LM_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's arguments")
    p_lm.set_defaults(func=lambda args: _cmd_lm_eval(args.lm_eval_args))

    p_tasks = sub.add_parser(
        "lm-eval-tasks",
        help="print halludec's lm-eval task folder (for --include_path), or write one with the data folders filled",
        description=(
            "Without --out: print the task folder shipped in the package; its POPE and CHAIR tasks read "
            "$HALLUDEC_POPE_DIR and $HALLUDEC_COCO_DIR. With --out: write a copy whose tasks name the given folders."
        ),
    )
    p_tasks.add_argument("--pope-dir", default=None, help="POPE question files (coco_pope_<split>.json) or parquet")
    p_tasks.add_argument("--coco-dir", default=None, help="COCO 2014 folder with val2014/ and annotations/")
    p_tasks.add_argument("--out", default=None, help="folder to write the task files to")
    p_tasks.set_defaults(func=_cmd_lm_eval_tasks)


def run_lm_eval_passthrough(argv: Sequence[str]) -> int | None:
    """Run ``halludec lm-eval ...`` before argparse sees lm-eval's options; ``None`` for any other command.

    Args:
        argv: The ``halludec`` command's arguments.

    Returns:
        The exit code of ``lm-eval``, or ``None`` when ``argv`` is another subcommand.
    """
    args = list(argv)
    if not args or args[0] != "lm-eval":
        return None
    if len(args) == 1:
        print(LM_EVAL_EPILOG)
    return _cmd_lm_eval(args[1:])
