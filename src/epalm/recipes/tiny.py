"""A self-contained, seconds-long end-to-end run: tiny random LM + tiny ViT on a synthetic task.

The "image" is a noisy flat colour (red, green or blue); the text is ``BOS what colour ? <answer> EOS``.
A frozen random LM cannot know colours; the trained connectors and prompt make it answer from
the image. Used by ``epalm tiny-demo`` and the tests: the real code paths, no downloads.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

COLOURS = ["red", "green", "blue"]
BOS, EOS, PAD = 2, 2, 1
QUESTION = [10, 11, 12]
ANSWER_IDS = [20, 21, 22]


class ColourDataset(Dataset):
    def __init__(self, n: int = 48, seed: int = 0, image_size: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.noise = torch.randn(n, 3, image_size, image_size, generator=g) * 0.1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        c = int(self.labels[i])
        image = self.noise[i].clone()
        image[c] += 2.0
        ids = torch.tensor([BOS, *QUESTION, ANSWER_IDS[c], EOS])
        labels = torch.tensor([-100] * (1 + len(QUESTION)) + [ANSWER_IDS[c], EOS])
        return {"pixel_values": image, "input_ids": ids, "labels": labels, "answer": c}


def collate(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([x["pixel_values"] for x in items]),
            "input_ids": torch.stack([x["input_ids"] for x in items]),
            "attention_mask": torch.ones(len(items), items[0]["input_ids"].shape[0], dtype=torch.long),
            "labels": torch.stack([x["labels"] for x in items])}


def tiny_model(variant: str = "epalm", seed: int = 0, family: str = "opt"):
    """Random 4-layer OPT (hidden 32) + 3-layer ViT (16 px): milliseconds to build.

    The LM's weights are drawn with std 0.4 (not 0.02) so that a tiny random LM's logits respond
    to its prefix at all.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, ViTConfig, ViTModel

    from epalm.core.config import EPALMConfig
    from epalm.core.encoders import wrap_hf_encoder
    from epalm.core.model import EPALM

    torch.manual_seed(seed)
    common = dict(vocab_size=97, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if family == "opt":
        lm = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
                                      max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, **common))
    else:
        lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, **common))
    lm.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.4)
    vit = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                             image_size=16, patch_size=8), add_pooling_layer=False)
    return EPALM(lm.eval(), wrap_hf_encoder(vit.eval(), num_layers=2),
                 EPALMConfig(lm="./lm", encoder="./encoder", variant=variant, num_encoder_layers=2))


def accuracy(model, dataset: ColourDataset) -> float:
    batch = collate([dataset[i] for i in range(len(dataset))])
    prompt = batch["input_ids"][:, : 1 + len(QUESTION)]
    new = model.generate(batch["pixel_values"], prompt, max_new_tokens=2, num_beams=3,
                         pad_token_id=PAD, eos_token_id=EOS)
    truth = torch.tensor([ANSWER_IDS[int(c)] for c in dataset.labels])
    return float((new[:, 0] == truth).float().mean())


def run(output_dir: str = "runs/tiny-demo", variant: str = "epalm", epochs: int = 15) -> dict:
    """Train a few steps, generate, report accuracy before/after (chance = 1/3)."""
    from epalm.training.trainer import OptimConfig, TrainConfig, Trainer

    model = tiny_model(variant)
    train, test = ColourDataset(96, seed=0), ColourDataset(48, seed=1)
    before = accuracy(model, test)
    cfg = TrainConfig(output_dir=output_dir, epochs=epochs, batch_size=16, cpu=True, log_every=5,
                      optim=OptimConfig(lr=1e-2, warmup_lr=3e-3, min_lr=1e-3, prompt_lr=1e-2))
    Trainer(model, train, collate, cfg).train()
    after = accuracy(model, test)
    model.save_pretrained(f"{output_dir}/final", save_base_models=True)  # random models: saved with the weights
    return {"accuracy_before": before, "accuracy_after": after, "chance": 1 / 3,
            "trainable_parameters": model.parameter_report()["trainable"], "output_dir": output_dir}
