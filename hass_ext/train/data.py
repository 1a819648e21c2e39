"""prepare_data: conversations -> chat template + loss mask -> target forward -> shards (see shards.py).

Work is cut into shards of ``shard_size`` consecutive selected conversations. A shard is computed whole, written
atomically, and only then recorded in manifest.json (with a fingerprint of its conversations), so an interrupted
run (Ctrl-C, a crash, a killed job) is resumed by running the same command again: finished shards are kept, the
first unrecorded one is recomputed, and no example is lost or written twice. A larger selection of the same
source grows the folder the same way. Re-running with different settings into the same folder is refused.
"""
import hashlib
import json
import os
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..target import resolve_target
from .conversations import iter_examples, load_records
from .shards import FORMAT, MANIFEST, MASK_CONVENTION, atomic_write_json, pack_examples, read_manifest, \
    shard_name, write_shard

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
        deterministic shuffle when ``seed`` is an int. Running again with a larger ``num_conversations`` grows
        the folder: every finished shard whose conversations are unchanged is kept, the rest is recomputed.
    shard_size: conversations per shard (the unit of resumption). batch_tokens: padded tokens per target forward.
    hidden_dtype: "bfloat16" (default), "float16" or "float32" for the stored features.
    stop_after_shards: return after writing this many new shards (the folder stays resumable).
    Raises ValueError when the finished folder holds no example (every selected conversation was unusable).
    """
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3, got {max_len}")
    if shard_size < 1 or batch_tokens < 1:
        raise ValueError(f"shard_size and batch_tokens must be positive, got {shard_size}, {batch_tokens}")
    if hidden_dtype not in _DTYPES:
        raise ValueError(f"hidden_dtype must be one of {sorted(_DTYPES)}, got {hidden_dtype!r}")
    target = resolve_target(target)
    tok = target.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"the tokenizer of {target.name} has no chat template")
    records, source = load_records(conversations, start=start, num=num_conversations, seed=seed)
    if not records:
        raise ValueError(f"no conversations selected from {source['name']} (start={start}, num={num_conversations})")
    selection = {k: source.pop(k) for k in ("num_conversations", "truncated_tail_chars") if k in source}
    selection["selected"] = len(records)
    settings = {  # what every shard of the folder must share
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
    num_shards = (len(records) + shard_size - 1) // shard_size
    chunks = [records[k * shard_size:(k + 1) * shard_size] for k in range(num_shards)]
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    shards = []
    if os.path.exists(manifest_path):
        old = read_manifest(out_dir)
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out_dir} already holds data prepared with different settings ({', '.join(changed)}); "
                             "use a new folder or the original settings")
        for k, sh in enumerate(old["shards"]):  # keep the leading shards made from the same conversations
            if k >= num_shards or sh.get("records_sha256") != _fingerprint(chunks[k]):
                break
            shards.append(sh)
        dropped = [sh["file"] for sh in old["shards"][len(shards):]]
    else:
        dropped = []
    manifest = {"format": FORMAT, **settings, "selection": selection, "complete": False, "shards": shards}
    _update_totals(manifest, num_shards)
    atomic_write_json(manifest_path, manifest)
    for name in dropped:  # shards of conversations no longer selected (recomputed ones are rewritten anyway)
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


    bar = tqdm(total=len(records), initial=sum(len(c) for c in chunks[:len(shards)]), unit="conv",
               desc="prepare-data", disable=not progress)
    written = 0
    try:
        for k in range(len(shards), num_shards):
            if stop_after_shards is not None and written >= stop_after_shards:
                break
            chunk = chunks[k]
            skipped = {}
            examples = list(iter_examples(tok, chunk, max_len, system_prompt, skipped))
            hidden = target_features(target, [e[1] for e in examples], batch_tokens, on_batch=bar.update)
            tensors = pack_examples([(e[0], e[1], h, e[2]) for e, h in zip(examples, hidden)],
                                    settings["hidden_size"], _DTYPES[hidden_dtype])
            name = shard_name(k)
            digest = write_shard(os.path.join(out_dir, name), tensors)
            manifest["shards"].append({
                "file": name, "conversations": [k * shard_size, k * shard_size + len(chunk)],
                "records_sha256": _fingerprint(chunk), "examples": len(examples),
                "tokens": int(tensors["offsets"][-1]), "loss_tokens": int(tensors["loss_mask"].sum()),
                "skipped": skipped, "sha256": digest})
            _update_totals(manifest, num_shards)
            atomic_write_json(manifest_path, manifest)
            written += 1
            bar.update(len(chunk) - len(examples))  # the skipped ones
            bar.set_postfix(examples=manifest["num_examples"], tokens=manifest["num_tokens"])
    finally:
        bar.close()
    if manifest["complete"] and manifest["num_examples"] == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(manifest["skipped"].items())) or "none recorded"
        raise ValueError(f"none of the {len(records)} selected conversations gave a training example (skipped: "
                         f"{reasons}); check the records' layout and --max-len")
    return manifest


def _update_totals(manifest: dict, num_shards: int) -> None:
    shards = manifest["shards"]
    manifest["num_examples"] = sum(s["examples"] for s in shards)
    manifest["num_tokens"] = sum(s["tokens"] for s in shards)
    skipped = {}
    for s in shards:
        for r, c in s["skipped"].items():
            skipped[r] = skipped.get(r, 0) + c
    manifest["skipped"] = skipped
    manifest["complete"] = len(shards) == num_shards
