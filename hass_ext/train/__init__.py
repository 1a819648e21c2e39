"""hass_ext.train: training data preparation and the HASS / EAGLE draft trainer.

- regenerate (regenerate.py): self-distillation data, the target's own greedy answers to first user turns.
- prepare_data (data.py): conversations (conversations.py) -> chat template + assistant-token loss mask ->
  target features -> safetensors shards (shards.py); resumable.
- ShardDataset, collate (shards.py): deterministic reading of prepared data, train / held-out split.
- Trainer, TrainConfig (trainer.py): HASS (harmonized context alignment, align.py; top-K distillation, loss.py)
  or EAGLE training with checkpoints (also on Ctrl-C / SIGTERM: TrainingInterrupted), exact resume and DDP;
  held-out k-step acceptance (heldout.py).
- token_frequencies, hot_vocabulary (token_map.py): a reduced draft vocabulary from prepared data.
"""
from .conversations import encode_conversation, iter_json_records, load_records, to_messages  # noqa: F401
from .data import prepare_data  # noqa: F401
from .regenerate import regenerate  # noqa: F401
from .shards import CorruptShardError, ShardDataset, collate  # noqa: F401
from .token_map import hot_vocabulary, template_token_ids, token_frequencies  # noqa: F401
from .trainer import TrainConfig, Trainer, TrainingInterrupted  # noqa: F401
