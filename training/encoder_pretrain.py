"""Pretrain the tiny default model's two encoders on synthetic scenes (no hub weights exist here).

The roles mirror the real encoders' strengths, so that the FtZ comparison means something:

* the anchor (CLIP-like, coarse 16-px patches) learns *scene-level* semantics from its pooled
  output: which (shape, colour) pairs are present and how many shapes there are;
* the augmenter (DINOv2-like, fine 8-px patches) learns *local detail*: for every patch, which
  colours (and dark text strokes) it contains, plus the identity of the small written character,
  read from its CLS token and from every patch token (as DINOv2's patch tokens carry what the
  image shows, not only what their own 14 px hold). Without the patch-token target the character
  lived in the CLS token alone and a randomly initialised cross-attention, which averages over
  all augmenter tokens, did not find it in the shipped model's budget (a probe of the fused
  tokens read it at chance).

Both are then frozen for the FtZ stages, like CLIP and DINOv2 in the paper. A linear head per
task is trained with the encoder and thrown away afterwards.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ftz_edge.preprocess import ImageProcessorSpec, preprocess_batch
from ftz_edge.training import synthetic

COLORS = list(synthetic.PALETTE)
PAIRS = [(kind, color) for kind in synthetic.SHAPES for color in COLORS]
# Per-pixel classes for the dense target: the palette colours, then dark text strokes.
PIXEL_COLORS = np.array([synthetic.PALETTE[c] for c in COLORS] + [(0, 0, 0)], dtype=np.float32)
CHARS = [None] + list(synthetic.CHARSET)


def scenes(n: int, seed: int, image_size: int = 64) -> list:
    rng = np.random.default_rng(seed)
    return [synthetic.generate_example(rng, str(rng.choice(synthetic.QTYPES)), image_size) for _ in range(n)]


def scene_targets(batch: list) -> dict[str, torch.Tensor]:
    present = torch.zeros(len(batch), len(PAIRS))
    for i, scene in enumerate(batch):
        for shape in scene.shapes:
            present[i, PAIRS.index((shape.kind, shape.color))] = 1
    return {
        "present": present,
        "count": torch.tensor([min(len(s.shapes), 4) for s in batch]),
        "char": torch.tensor([CHARS.index(s.text) for s in batch]),
    }


def patch_colour_targets(batch: list, patch: int) -> torch.Tensor:
    """(B, patches, classes) presence of each palette colour / text ink inside every patch."""
    images = np.stack([np.asarray(s.image, dtype=np.float32) for s in batch])  # B,H,W,3
    distance = np.linalg.norm(images[..., None, :] - PIXEL_COLORS, axis=-1)  # B,H,W,C
    hit = distance < 40  # exact palette pixels (shapes are drawn without antialiasing) and dark ink
    b, h, w, c = hit.shape
    hit = hit.reshape(b, h // patch, patch, w // patch, patch, c).any(axis=(2, 4))
    return torch.from_numpy(hit.reshape(b, -1, c).astype(np.float32))


def pretrain_anchor(anchor: nn.Module, spec: ImageProcessorSpec, steps: int, seed: int, batch_size: int = 128) -> dict:
    width = anchor.config.hidden_size
    heads = nn.ModuleDict({"present": nn.Linear(width, len(PAIRS)), "count": nn.Linear(width, 5)})
    losses = _train(anchor, heads, spec, steps, seed, batch_size, _anchor_targets, _anchor_loss, "anchor")
    held_out = scenes(512, seed + 10_000)
    with torch.no_grad():
        pooled = anchor(pixel_values=torch.from_numpy(preprocess_batch([s.image for s in held_out], spec))).pooler_output
        targets = scene_targets(held_out)
        present = ((heads["present"](pooled) > 0).float() == targets["present"]).all(dim=1).float().mean()
        count = (heads["count"](pooled).argmax(-1) == targets["count"]).float().mean()
    return {"loss_first": losses[0], "loss_last": losses[-1], "held_out_all_pairs_right": float(present),
            "held_out_count_accuracy": float(count)}


def _anchor_targets(pool: list, model) -> dict[str, torch.Tensor]:
    return scene_targets(pool)


def _anchor_loss(model, heads, pixels, targets):
    pooled = model(pixel_values=pixels).pooler_output
    return (F.binary_cross_entropy_with_logits(heads["present"](pooled), targets["present"])
            + F.cross_entropy(heads["count"](pooled), targets["count"]))


def pretrain_augmenter(augmenter: nn.Module, spec: ImageProcessorSpec, steps: int, seed: int, batch_size: int = 128) -> dict:
    width = augmenter.config.hidden_size
    heads = nn.ModuleDict({"patch": nn.Linear(width, len(PIXEL_COLORS)), "char": nn.Linear(width, len(CHARS))})
    losses = _train(augmenter, heads, spec, steps, seed, batch_size, _augmenter_targets, _augmenter_loss, "augmenter")
    held_out = scenes(512, seed + 10_000)
    with torch.no_grad():
        hidden = augmenter(pixel_values=torch.from_numpy(preprocess_batch([s.image for s in held_out], spec))).last_hidden_state
        patches = patch_colour_targets(held_out, augmenter.config.patch_size)
        patch_right = ((heads["patch"](hidden[:, 1:]) > 0).float() == patches).all(dim=-1).float().mean()
        char = (heads["char"](hidden[:, 0]).argmax(-1) == scene_targets(held_out)["char"]).float().mean()
    return {"loss_first": losses[0], "loss_last": losses[-1], "held_out_patches_right": float(patch_right),
            "held_out_char_accuracy": float(char)}


def _augmenter_targets(pool: list, model) -> dict[str, torch.Tensor]:
    patches = torch.cat([patch_colour_targets(pool[i:i + 256], model.config.patch_size) for i in range(0, len(pool), 256)])
    return {"patch": patches, "char": scene_targets(pool)["char"]}


def _augmenter_loss(model, heads, pixels, targets):
    hidden = model(pixel_values=pixels).last_hidden_state
    patch_char = heads["char"](hidden[:, 1:])  # every patch token too, not only CLS: see below
    return (F.binary_cross_entropy_with_logits(heads["patch"](hidden[:, 1:]), targets["patch"])
            + F.cross_entropy(heads["char"](hidden[:, 0]), targets["char"])
            + F.cross_entropy(patch_char.flatten(0, 1), targets["char"].repeat_interleave(patch_char.shape[1])))


def _train(model, heads, spec, steps, seed, batch_size, targets_fn, loss_fn, name) -> list[float]:
    torch.manual_seed(seed)
    model.requires_grad_(True).train()
    pool = scenes(4096, seed)  # re-used across steps: enough variety for a 4-layer, 64-wide ViT
    pixels_all = torch.from_numpy(preprocess_batch([s.image for s in pool], spec))
    targets_all = targets_fn(pool, model)  # computed once: the per-step numpy work was the slow part
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc=f"pretrain {name}"):
        index = torch.randint(len(pool), (batch_size,), generator=generator)
        loss = loss_fn(model, heads, pixels_all[index], {k: v[index] for k, v in targets_all.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.requires_grad_(False).eval()
    return losses


def pretrain_llm_text(folder, examples: list, steps: int, seed: int, batch_size: int = 32, lr: float = 2e-3) -> dict:
    """Text-only pretraining of the tiny LLM: each training question asked about the scene's
    description in words (``synthetic.describe``) where the image will go. It learns the chat
    format, the answer words, and to answer from what precedes the question: the language ability
    a real VLM's LLM brings. LLaVA's stage 1 then has something to align to (image tokens that
    read like the description); with a random or question-only LLM the frozen-LLM stage barely
    moves. Answer tokens (and the end of turn) are the targets; saved back into ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from ftz_edge import prompt

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    special = {k: getattr(tokenizer, k) or "" for k in ("bos_token", "eos_token")}
    template = tokenizer.chat_template
    sequences = []
    for ex in examples:
        user = {"role": "user", "content": f"{synthetic.describe(ex)}\n{ex.question}{synthetic.SUFFIX}"}
        turn = [user, {"role": "assistant", "content": ex.answer}]
        prefix = prompt.tokenize(prompt.render_chat([user], template, special, True), tokenizer.backend_tokenizer)
        full = prompt.tokenize(prompt.render_chat(turn, template, special, False), tokenizer.backend_tokenizer)
        if full[: len(prefix)] != prefix:
            raise ValueError("the chat template's generation prompt is not a prefix of the answered turn")
        sequences.append((full, len(prefix)))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 30), steps)
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    losses = []
    for _ in range(steps):
        index = torch.randint(len(sequences), (batch_size,), generator=generator).tolist()
        longest = max(len(sequences[i][0]) for i in index)
        ids = torch.full((batch_size, longest), pad)
        labels = torch.full((batch_size, longest), -100)
        mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, i in enumerate(index):
            full, start = sequences[i]
            ids[row, : len(full)] = torch.tensor(full)
            labels[row, start: len(full)] = torch.tensor(full[start:])
            mask[row, : len(full)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(folder)
    return {"loss_first": losses[0], "loss_last": float(np.mean(losses[-20:])), "steps": steps, "batch": batch_size}
