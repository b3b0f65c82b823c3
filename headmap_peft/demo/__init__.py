"""The embedded default: a small Llama pretrained locally on a generated knowledge corpus, and a QA task over it.

```python
from headmap_peft.demo import load_default_model, task_splits

model, tokenizer = load_default_model()   # pretrained on first use (about 2 minutes on 2 CPU cores), cached after
splits = task_splits(seed=0)              # "train"/"eval" {"prompt", "target"} records, split by person
```
"""

from .cache import (
    CACHE_ENV,
    build_default_model,
    cache_root,
    default_model_path,
    demo_info,
    is_cached,
    load_default_model,
)
from .corpus import ATTRIBUTES, QUESTIONS, TEMPLATES, Person, make_people, pretraining_sentences, question_records
from .evaluate import accuracy, finetune, predictions, targets
from .pretrain import DemoConfig, fact_accuracy, pretrain
from .task import task_splits
from .tokenizer import build_tokenizer

__all__ = [
    "ATTRIBUTES",
    "CACHE_ENV",
    "QUESTIONS",
    "TEMPLATES",
    "DemoConfig",
    "Person",
    "accuracy",
    "build_default_model",
    "build_tokenizer",
    "cache_root",
    "default_model_path",
    "demo_info",
    "fact_accuracy",
    "finetune",
    "is_cached",
    "load_default_model",
    "make_people",
    "predictions",
    "pretrain",
    "pretraining_sentences",
    "question_records",
    "targets",
    "task_splits",
]
