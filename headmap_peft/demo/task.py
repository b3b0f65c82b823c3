"""The downstream task: question answering over the demo facts, split into train and eval by person."""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

from .corpus import make_people, question_records
from .pretrain import DemoConfig


def task_splits(seed: int = 0, config: DemoConfig | None = None, eval_fraction: float = 0.3) -> DatasetDict:
    """QA records ``{"prompt", "target", "person", "attribute"}`` split by person into "train" and "eval".

    ``"Q: Where does Alice Smith live? A:"`` -> ``" Paris"``: the pretraining text states every fact but never asks
    a question, so the format is new; no eval person appears in train. `seed` picks which people go where.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction}")
    config = config or DemoConfig()
    people = make_people(config.num_people, config.world_seed)
    order = list(range(len(people)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(people) * eval_fraction))
    if n_eval >= len(people):
        raise ValueError(f"eval_fraction={eval_fraction} leaves no train people out of {len(people)}")
    eval_people = sorted(order[:n_eval])
    train_people = sorted(order[n_eval:])
    return DatasetDict(
        {
            "train": Dataset.from_list(question_records([people[i] for i in train_people])),
            "eval": Dataset.from_list(question_records([people[i] for i in eval_people])),
        }
    )
