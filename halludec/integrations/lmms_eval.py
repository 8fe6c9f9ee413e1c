"""``halludec_hf`` for lmms-eval: an HF vision-language model with a halludec strategy applied around ``generate``.

lmms-eval (>= 0.7) finds it through the ``lmms_eval.models`` entry point that halludec declares (:func:`manifest`),
so with both installed::

    python -m lmms_eval --model halludec_hf --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=vcd,alpha=1.0 \\
        --tasks pope --batch_size 8

lmms-eval stays optional: this module is imported only by lmms-eval itself. It is a "simple" lmms-eval model (the
task's ``doc_to_visual`` + ``doc_to_text``): one image per prompt, the question rendered with the processor's chat
template as halludec's runner does, greedy unless the task asks for sampling. Model arguments: ``pretrained`` (HF
id, folder, or ``lab``), ``strategy`` and its fields (as for lm-eval's ``halludec-vlm``), ``batch_size``, ``device``
(``auto``, ``cpu``, ``cuda:0``), ``dtype`` (``auto``, ``bf16``, ``fp16``, ``fp32``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(f"halludec's lmms-eval model needs lmms-eval (>= 0.7): pip install lmms-eval ({err}).") from err

from halludec.integrations.strategy_args import split_model_args

MODEL_ID = "halludec_hf"
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_NEW_TOKENS = 128


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: the manifest lmms-eval registers ``halludec_hf`` from."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.HalludecLMMS")


class HalludecLMMS(lmms):
    """lmms-eval model: ``halludec.generate`` with the configured strategy on one image + question per request.

    Args:
        pretrained: HF id, local folder, or ``lab`` (the lab model).
        strategy: Name, preset, ``a+b`` composition (default ``none``).
        batch_size: Prompts per ``generate`` call (left-padded).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda:N``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``.
        **kwargs: Strategy fields (``alpha=1.0``; ``vcd.alpha=1.0`` with several strategies).
    """

    is_simple = True

    def __init__(
        self, pretrained: str, strategy: str = "none", batch_size: int | str = 1, device: str = "auto", **kwargs: Any
    ) -> None:
        super().__init__()
        dtype = str(kwargs.pop("dtype", "auto"))
        self.strategies, rest = split_model_args(strategy, kwargs)
        if rest:
            raise ValueError(
                f"halludec_hf got unknown model argument(s) {sorted(rest)}; it takes pretrained, strategy, the "
                "strategy's fields, batch_size, device and dtype."
            )
        from halludec.cli import load_model

        self.pretrained = str(pretrained)
        self.model, self.processor = load_model(self.pretrained, dtype, device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid; use an integer >= 1.")

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answer every request (``contexts, gen_kwargs, doc_to_visual, doc_id, task, split``) in order.

        Consecutive requests with the same generation settings are batched.
        """
        out: list[str] = []
        batch: list[Any] = []
        for request in requests:
            if batch and (len(batch) == self.batch_size or request.args[1] != batch[0].args[1]):
                out += self._generate(batch)
                batch = []
            batch.append(request)
        if batch:
            out += self._generate(batch)
        return out

    def _generate(self, batch: list[Any]) -> list[str]:
        import halludec
        from halludec.vlm_adapters.inputs import chat_inputs

        images, questions = [], []
        for request in batch:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
            if len(visuals) != 1:
                raise ValueError(
                    f"halludec_hf takes one image per prompt; {task} doc {doc_id} has {len(visuals)}. Use tasks with "
                    "one image per question (POPE, CHAIR-style captioning, MME, ...)."
                )
            images.append(visuals[0].convert("RGB"))
            questions.append(context.replace(IMAGE_PLACEHOLDER, "").strip())
        gen = dict(batch[0].args[1])
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        settings = {
            "max_new_tokens": int(gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            "do_sample": bool(gen.get("do_sample", False)) or float(gen.get("temperature", 0) or 0) > 0,
            "num_beams": int(gen.get("num_beams", 1) or 1),
        }
        if settings["do_sample"]:
            settings.update(temperature=float(gen.get("temperature") or 1.0), top_p=float(gen.get("top_p") or 1.0))
        tok = getattr(self.processor, "tokenizer", self.processor)
        inputs = chat_inputs(self.processor, images, questions, self.model.device)
        ids = halludec.generate(
            self.model, inputs, self.strategies, processor=self.processor, questions=questions, **settings
        )
        texts = tok.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)  # [B, new]
        answers = []
        for text in texts:
            for stop in until:
                text = text.split(stop)[0] if stop else text
            answers.append(text.strip())
        for request, answer in zip(batch, answers, strict=True):
            self.cache_hook.add_partial("generate_until", tuple(request.args[:2]), answer)
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Not supported: halludec strategies act on generation."""
        raise NotImplementedError("halludec_hf supports generation tasks only (generate_until), not loglikelihood.")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Not supported."""
        raise NotImplementedError("halludec_hf does not support multi-round generation tasks.")
