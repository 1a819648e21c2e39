"""hass_ext.train: training data preparation and the HASS / EAGLE draft trainer.

- prepare_data (data.py): conversations -> chat template + assistant-token loss mask -> target features ->
  safetensors shards (format in shards.py); resumable.
- ShardDataset, collate (shards.py): deterministic reading of prepared data, train / held-out split.
"""
from .conversations import encode_conversation, iter_json_records, load_records, to_messages  # noqa: F401
from .data import prepare_data  # noqa: F401
from .shards import CorruptShardError, ShardDataset, collate  # noqa: F401
