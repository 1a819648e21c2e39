"""prepare_data: conversations -> chat template + loss mask -> target forward -> shards (see shards.py).

Work is cut into shards of ``shard_size`` consecutive selected conversations. A shard is computed whole, written
atomically, and only then recorded in manifest.json, so an interrupted run (Ctrl-C, a crash, a killed job) is
resumed by running the same command again: finished shards are kept, the first unrecorded one is recomputed, and
no example is lost or written twice. Re-running with different settings into the same folder is refused.
"""
import hashlib
import json
import os
from typing import Optional

import torch

from .conversations import iter_examples, load_records
from .shards import FORMAT, MANIFEST, MASK_CONVENTION, atomic_write_json, pack_examples, read_manifest, \
    shard_name, write_shard

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _resolve_target(target):
    from ..target import Target, load_target

    if target is None or isinstance(target, str):
        return load_target(target)
    if isinstance(target, Target):
        return target
    raise ValueError(f"target must be None, a model name/path or a hass_ext.Target, got {type(target).__name__}")


def _fingerprint(records) -> str:
    h = hashlib.sha256()
    for idx, rec in records:
        h.update(json.dumps([idx, rec], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


@torch.inference_mode()
def target_features(target, sequences, batch_tokens: int = 16384, on_batch=None):
    """Final-norm hidden states ``[L_i, H]`` of the target for each token list, batched by a token budget.

    Sequences are sorted by length and right-padded; the attention mask hides the padding (with right padding
    and causal attention the real positions never see it anyway). ``on_batch(n)`` is called after each forward.
    """
    model = target.model.model
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [None] * len(sequences)
    i = 0
    while i < len(order):
        longest = len(sequences[order[i]])
        n = max(1, min(len(order) - i, batch_tokens // max(1, longest)))
        idx = order[i:i + n]
        ids = torch.zeros(n, longest, dtype=torch.long)
        att = torch.zeros(n, longest, dtype=torch.long)
        for b, j in enumerate(idx):
            ids[b, :len(sequences[j])] = torch.as_tensor(sequences[j])
            att[b, :len(sequences[j])] = 1
        hidden = model(input_ids=ids.to(target.device), attention_mask=att.to(target.device),
                       use_cache=False).last_hidden_state.float().cpu()
        for b, j in enumerate(idx):
            out[j] = hidden[b, :len(sequences[j])].clone()
        i += n
        if on_batch is not None:
            on_batch(n)
    return out


def prepare_data(target, conversations, out_dir: str, max_len: int = 2048, *, num_conversations: Optional[int] = None,
                 start: int = 0, seed: Optional[int] = None, shard_size: int = 256, batch_tokens: int = 16384,
                 system_prompt: Optional[str] = None, hidden_dtype: str = "bfloat16", progress: bool = True,
                 stop_after_shards: Optional[int] = None) -> dict:
    """Build (or finish building) a training-data folder for a draft of ``target``. Returns the manifest.

    target: a hass_ext.Target, a model name/path, or None for the embedded SmolLM2-135M-Instruct.
    conversations: "sharegpt" (the bundled ShareGPT V3), a JSON/JSONL path, or a list of records (see
        conversations.py for the accepted layouts and the role / system-prompt policies).
    out_dir: the data folder (created); manifest.json + shard-*.safetensors.
    max_len: tokens kept per conversation (longer ones are truncated).
    num_conversations, start, seed: which records: ``[start, start + num)`` of the source order, or of a
        deterministic shuffle when ``seed`` is an int.
    shard_size: conversations per shard (the unit of resumption). batch_tokens: padded tokens per target forward.
    hidden_dtype: "bfloat16" (default), "float16" or "float32" for the stored features.
    stop_after_shards: return after writing this many new shards (the folder stays resumable).
    """
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3, got {max_len}")
    if shard_size < 1 or batch_tokens < 1:
        raise ValueError(f"shard_size and batch_tokens must be positive, got {shard_size}, {batch_tokens}")
    if hidden_dtype not in _DTYPES:
        raise ValueError(f"hidden_dtype must be one of {sorted(_DTYPES)}, got {hidden_dtype!r}")
    target = _resolve_target(target)
    tok = target.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"the tokenizer of {target.name} has no chat template")
    records, source = load_records(conversations, start=start, num=num_conversations, seed=seed)
    if not records:
        raise ValueError(f"no conversations selected from {source['name']} (start={start}, num={num_conversations})")
    source["fingerprint"] = _fingerprint(records)
    source["selected"] = len(records)
    settings = {
        "target": target.name,
        "hidden_size": int(target.config.hidden_size),
        "vocab_size": int(target.config.vocab_size),
        "hidden_dtype": hidden_dtype,
        "target_dtype": str(target.dtype).replace("torch.", ""),
        "max_len": int(max_len),
        "shard_size": int(shard_size),
        "system_prompt": system_prompt,
        "chat_template_sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest(),
        "source": source,
        "mask_convention": MASK_CONVENTION,
    }
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        manifest = read_manifest(out_dir)
        changed = sorted(k for k in settings if manifest.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out_dir} already holds data prepared with different settings ({', '.join(changed)}); "
                             "use a new folder or the original settings")
    else:
        manifest = {"format": FORMAT, **settings, "complete": False, "num_examples": 0, "num_tokens": 0,
                    "skipped": {}, "shards": []}
        atomic_write_json(manifest_path, manifest)

    num_shards = (len(records) + shard_size - 1) // shard_size
    done = len(manifest["shards"])
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), initial=min(done * shard_size, len(records)), unit="conv",
               desc="prepare-data", disable=not progress)
    written = 0
    try:
        for k in range(done, num_shards):
            if stop_after_shards is not None and written >= stop_after_shards:
                break
            chunk = records[k * shard_size:(k + 1) * shard_size]
            skipped = {}
            examples = list(iter_examples(tok, chunk, max_len, system_prompt, skipped))
            hidden = target_features(target, [e[1] for e in examples], batch_tokens, on_batch=bar.update)
            tensors = pack_examples([(e[0], e[1], h, e[2]) for e, h in zip(examples, hidden)],
                                    settings["hidden_size"], _DTYPES[hidden_dtype])
            name = shard_name(k)
            digest = write_shard(os.path.join(out_dir, name), tensors)
            ntok = int(tensors["offsets"][-1])
            manifest["shards"].append({"file": name, "conversations": [k * shard_size, k * shard_size + len(chunk)],
                                       "examples": len(examples), "tokens": ntok,
                                       "loss_tokens": int(tensors["loss_mask"].sum()), "sha256": digest})
            manifest["num_examples"] += len(examples)
            manifest["num_tokens"] += ntok
            for r, c in skipped.items():
                manifest["skipped"][r] = manifest["skipped"].get(r, 0) + c
            manifest["complete"] = len(manifest["shards"]) == num_shards
            atomic_write_json(manifest_path, manifest)
            written += 1
            bar.update(len(chunk) - len(examples))  # the skipped ones
            bar.set_postfix(examples=manifest["num_examples"], tokens=manifest["num_tokens"])
    finally:
        bar.close()
    return manifest
