"""Training examples for the lab model: conversations about a scene, tokenised, with the answer tokens labelled.

An example is one scene and either a caption turn (``Describe this picture.`` -> ``a fork and a knife .``) or a few
yes/no turns (``Is there a knife in the image?`` -> ``yes``). Questions are positive half of the time; negatives are
drawn uniformly from the absent kinds, so an absent partner is rarely asked about — as in real instruction data, the
model is seldom told that a fork comes without its knife.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from halludec.lab.model import CAPTION_PROMPT, QUESTION, image_tokens
from halludec.lab.scenes import OBJECTS, Scene, sample_scene

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EOS_WEIGHT = 0.2  # weight of the closing </s> of a yes/no answer (the answer word has weight 1)


@dataclass
class Batch:
    """A padded training batch.

    Attributes:
        input_ids: ``[B, L]`` (right-padded).
        attention_mask: ``[B, L]``.
        pixel_values: ``[B, 3, 64, 64]`` normalised as the CLIP image processor does.
        weights: ``[B, L]`` float loss weight of predicting token ``t`` (0 outside answers; each answer turn sums
            to 1, so an example's loss is the mean over its turns).
    """

    input_ids: Any
    attention_mask: Any
    pixel_values: Any
    weights: Any


def pixel_values(images: list[np.ndarray]) -> Any:
    """CLIP normalisation of uint8 ``[64, 64, 3]`` images -> ``[B, 3, 64, 64]`` float32 (what the processor gives)."""
    import torch

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def conversation(scene: Scene, rng: np.random.Generator, caption: bool, turns: int) -> list[dict[str, Any]]:
    """A training conversation about ``scene``: one caption turn, or ``turns`` yes/no turns.

    Args:
        scene: The scene.
        rng: Drives the choice of questions.
        caption: A caption turn instead of questions.
        turns: Number of yes/no turns.

    Returns:
        Chat messages in the processor's format (the image in the first user turn).
    """
    image = {"type": "image"}
    if caption:
        return [
            {"role": "user", "content": [image, {"type": "text", "text": CAPTION_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": scene.caption()}]},
        ]
    present = list(dict.fromkeys(scene.names))
    absent = [o for o in OBJECTS if o not in present]
    messages: list[dict[str, Any]] = []
    for k in range(turns):
        positive = bool(present) and (rng.random() < 0.5 or not absent)
        pool = present if positive else absent
        obj = pool.pop(int(rng.integers(len(pool))))
        content = [{"type": "text", "text": QUESTION.format(obj=obj)}]
        messages.append({"role": "user", "content": [image, *content] if k == 0 else content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "yes" if positive else "no"}]})
    return messages


def make_batch(processor: Any, seeds: list[int], rng: np.random.Generator, easy: bool, p_caption: float) -> Batch:
    """Build one training batch from scene seeds.

    Args:
        processor: The lab processor (its tokenizer and chat template render the text).
        seeds: One scene seed per example.
        rng: Drives the example kinds and the questions.
        easy: Curriculum scenes (every object plainly visible).
        p_caption: Probability that an example is a caption turn.

    Returns:
        The :class:`Batch`.
    """
    import torch

    tok = processor.tokenizer
    image_token = processor.image_token
    n_image = image_tokens(processor.patch_size)
    rows: list[list[int]] = []
    weights: list[list[float]] = []
    images = []
    assistant_id = tok.convert_tokens_to_ids("assistant")
    colon_id = tok.convert_tokens_to_ids(":")
    for seed in seeds:
        scene = sample_scene(seed, easy=easy)
        images.append(scene.render())
        is_caption = rng.random() < p_caption
        messages = conversation(scene, rng, is_caption, turns=int(rng.integers(2, 5)))
        text = processor.apply_chat_template(messages, tokenize=False)
        text = text.replace(image_token, image_token * n_image)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        w = [0.0] * len(ids)
        # every "ASSISTANT :" is followed by the answer tokens up to and including </s>
        starts = [i + 2 for i in range(len(ids) - 1) if ids[i] == assistant_id and ids[i + 1] == colon_id]
        for start in starts:
            end = ids.index(tok.eos_token_id, start)
            n = end - start + 1
            if is_caption:
                for t in range(start, end + 1):
                    w[t] = 1.0 / n
            else:
                for t in range(start, end):
                    w[t] = 1.0 / (n - 1)
                w[end] = EOS_WEIGHT
        total = sum(w)
        rows.append(ids)
        weights.append([x / total for x in w])
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    wt = torch.zeros((len(rows), length), dtype=torch.float32)
    for i, (ids, w) in enumerate(zip(rows, weights, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        wt[i, : len(ids)] = torch.tensor(w)
    return Batch(input_ids, mask, pixel_values(images), wt)
