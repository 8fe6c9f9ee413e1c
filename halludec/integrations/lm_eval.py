"""``halludec-vlm``: lm-eval's ``hf-multimodal`` model with a halludec strategy applied around every ``generate``.

Importing this module registers the model type with lm-eval (``pip install 'halludec[lmeval]'``)::

    import lm_eval
    import halludec.integrations.lm_eval  # registers "halludec-vlm"
    from halludec.integrations.lm_eval_tasks import task_dir

    lm_eval.simple_evaluate(
        model="halludec-vlm",
        model_args="pretrained=llava-hf/llava-1.5-7b-hf,strategy=vcd,alpha=1.0",
        tasks=["halludec_pope_adversarial"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir())),
        apply_chat_template=True,
    )

or with a model already in memory: ``HalludecVLM(pretrained=model, processor=processor, strategy="vcd")`` and
``simple_evaluate(model=that, ...)``. ``strategy`` takes a name, a preset (``pai:repro``), several joined with
``+`` (``vhr+vcd``: composition, in order) or ``Strategy`` instances; every other model argument that names a field of
the strategy sets it (``alpha=1.0``; with several strategies ``vcd.alpha=1.0``); the rest go to ``hf-multimodal``.

lm-eval 0.4.13's ``lm_eval`` command has a fixed model table, so the command line is ``halludec lm-eval <lm_eval's
arguments>`` (:func:`cli_main`), which registers the model first and then runs lm-eval's own entry point.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

try:
    import transformers
    from lm_eval.api.registry import register_model
    from lm_eval.models.hf_vlms import HFMultimodalLM
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"halludec's lm-eval integration needs lm-eval (>= 0.4.13): pip install 'halludec[lmeval]' ({err})."
    ) from err

import halludec
from halludec.decoding import Strategy
from halludec.integrations.strategy_args import split_model_args

__all__ = ["MODEL_NAME", "HalludecVLM", "cli_main", "register", "split_model_args"]

logger = logging.getLogger("halludec")
MODEL_NAME = "halludec-vlm"


@register_model(MODEL_NAME)
class HalludecVLM(HFMultimodalLM):
    """lm-eval's ``hf-multimodal`` with a halludec strategy applied around every ``generate`` call.

    Args:
        pretrained: HF id, local folder (``halludec lab-path`` for the lab model) or a loaded model.
        strategy: Name, preset, ``a+b`` composition, ``Strategy`` instance or a list (default ``none``).
        processor: The processor of an in-memory model (same as lm-eval's ``tokenizer=``).
        **kwargs: Strategy fields (see :func:`split_model_args`) and ``hf-multimodal`` arguments (``batch_size``,
            ``device``, ``dtype``, ``max_images``, ...).
    """

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel,
        strategy: str | Strategy | Sequence[str | Strategy] = "none",
        processor: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self.strategies, rest = split_model_args(strategy, kwargs)
        if processor is not None:
            if rest.get("tokenizer") is not None:
                raise ValueError("Pass the processor once: processor=... or tokenizer=..., not both.")
            rest["tokenizer"] = processor
        super().__init__(pretrained, **rest)
        self._warned_raw_prompt = False

    @property
    def strategy_description(self) -> list[dict[str, Any]]:
        """``{name, preset, config}`` of each applied strategy (as in halludec's results files)."""
        return [s.describe() for s in self.strategies]

    def _create_tokenizer(
        self,
        pretrained: str | transformers.PreTrainedModel,
        tokenizer: str | transformers.ProcessorMixin | None,
        revision: str | None = "main",
        trust_remote_code: bool | None = False,
        **kwargs: Any,
    ) -> None:
        """Set ``self.processor`` and ``self.tokenizer`` (upstream returns a given processor instead of setting it,
        and a given processor name is loaded without being set either)."""
        if tokenizer is None:
            super()._create_tokenizer(pretrained, tokenizer, revision, trust_remote_code, **kwargs)
            return
        if isinstance(tokenizer, str):
            tokenizer = transformers.AutoProcessor.from_pretrained(
                tokenizer, revision=revision, trust_remote_code=trust_remote_code, **self.pixels
            )
        if not hasattr(tokenizer, "tokenizer"):
            raise TypeError(
                f"halludec-vlm needs the model's processor (a transformers ProcessorMixin with a tokenizer), got "
                f"{type(tokenizer).__name__}; pass processor=AutoProcessor.from_pretrained(...)."
            )
        self.processor = tokenizer
        self.tokenizer = tokenizer.tokenizer

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """lm-eval's multimodal ``generate_until``; warns once when chat models get raw (untemplated) prompts."""
        has_template = getattr(self.processor, "chat_template", None) is not None
        if requests and not self.chat_applied and has_template and not self._warned_raw_prompt:
            self._warned_raw_prompt = True
            logger.warning(
                "halludec-vlm: prompts reach the model without its chat template; chat VLMs (LLaVA, Qwen-VL, the lab "
                "model) expect it: pass --apply_chat_template (simple_evaluate(..., apply_chat_template=True))."
            )
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _model_multimodal_generate(self, inputs: Any, max_length: int, stop: list[str], **generation_kwargs: Any):
        """``generate`` inside ``halludec.apply``: the strategy's hooks are installed for the call and removed after.

        Args:
            inputs: The processor's batch (``input_ids`` ``[B, L]`` left-padded, ``attention_mask``, image tensors).
            max_length: Prompt length plus the task's ``max_gen_toks``.
            stop: Stop sequences.
            **generation_kwargs: The task's generation settings.

        Returns:
            ``generate``'s token ids ``[B, L + new]``.
        """
        with halludec.apply(self.model, self.strategies, inputs, processor=self.processor) as call:
            processors = [*call.logits_processors, *(generation_kwargs.pop("logits_processor", None) or [])]
            if processors:
                generation_kwargs["logits_processor"] = transformers.LogitsProcessorList(processors)
            return super()._model_multimodal_generate(inputs, max_length, stop, **generation_kwargs)


def register() -> type[HalludecVLM]:
    """Make sure ``halludec-vlm`` is registered (importing this module does it); returns the class."""
    from lm_eval.api.registry import get_model

    if get_model(MODEL_NAME) is not HalludecVLM:  # pragma: no cover - only if another class took the name
        raise RuntimeError(f"lm-eval model name {MODEL_NAME!r} is registered to another class.")
    return HalludecVLM


def cli_main(argv: Sequence[str]) -> int:
    """``halludec lm-eval ...``: lm-eval's command line with ``halludec-vlm`` registered.

    The arguments are exactly ``lm_eval``'s (``--model halludec-vlm --model_args pretrained=...,strategy=vcd
    --tasks halludec_lab_pope_random --apply_chat_template ...``). Without ``--include_path``, halludec's task folder
    is added so its tasks are found; with one, that folder is used as given (e.g. one written by
    ``halludec lm-eval-tasks --out DIR``).

    Args:
        argv: lm-eval's arguments.

    Returns:
        The exit code.
    """
    from lm_eval.__main__ import cli_evaluate

    from halludec.integrations.lm_eval_tasks import task_dir

    register()
    args = list(argv)
    running = bool(args) and args[0] not in ("ls", "validate", "-h", "--help")
    if running and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(task_dir())]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = saved
    return 0
