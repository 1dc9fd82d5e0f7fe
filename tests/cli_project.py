"""A user's small project for the command-line tests: their own CSV data and a local Hugging Face model folder.

    project/
      data/train.csv, data/test.csv     two classes of short reviews
      model/                            a tiny BERT (no classification head) + the MiniLM tokenizer
      run.yaml                          a run config of that model on that data (1 epoch, 2 members)
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import yaml

WORDS = {"pos": ["great", "good", "lovely", "fine", "superb"], "neg": ["bad", "awful", "poor", "sad", "dull"]}
MAX_POSITIONS = 64


def reviews(n: int, seed: int, labels: tuple[str, ...] = ("pos", "neg")) -> str:
    rng = random.Random(seed)
    rows = [f"{' '.join(rng.choice(WORDS.get(c, ['meh'])) for _ in range(5))},{c}"
            for c in (labels[i % len(labels)] for i in range(n))]
    return "text,label\n" + "\n".join(rows) + "\n"


def make_project(root: Path) -> Path:
    """Write the project under `root`; returns the run config's path."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lora_ensemble.app.builders import minilm_path

    (root / "data").mkdir(parents=True)
    (root / "data" / "train.csv").write_text(reviews(16, 0))
    (root / "data" / "test.csv").write_text(reviews(6, 1))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=MAX_POSITIONS)
    BertModel(config).save_pretrained(root / "model")  # a backbone without a head, as on the Hub
    tokenizer.save_pretrained(root / "model")
    run = {
        "seed": 0,
        "model": {"name": str(root / "model"), "max_length": 16},
        "method": {"name": "lora_ensemble", "num_members": 2, "r": 2},
        "data": {"name": "csv", "batch_size": 4, "val_fraction": 0.25,
                 "path_or_paths": {"train": str(root / "data" / "train.csv"), "test": str(root / "data" / "test.csv")}},
        "training": {"epochs": 1, "lr": 1e-2, "progress_bar": False, "accelerator": "cpu"},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    return path


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (empty when the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
