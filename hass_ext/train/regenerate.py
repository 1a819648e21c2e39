"""Self-distillation data: the target's own greedy answers to the first user turns of a conversation source.

A draft is used on the target's outputs, so training it on text the target itself writes (instead of the answers
of the model that wrote the dataset) matches what it sees at decode time; SpecForge and Medusa-2 call this
regenerating the training data. ``regenerate`` writes one JSON line per answered record,
``{"source_index", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "finished"}``, which
``prepare_data`` reads like any ShareGPT-style file.

Resumable: lines are appended (and flushed) batch by batch; running the same call again skips the records already
answered and drops a last line cut off by an interruption. ``finished`` is False where the answer reached
``max_new_tokens`` before the end-of-turn token (its text then ends mid-answer).
"""
import json
import os
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..target import resolve_target
from .conversations import SkipConversation, check_no_special_tokens, load_records, to_messages


def _read_done(path: str) -> set:
    """Source indices already in ``path``; a trailing partial line (interrupted write) is cut off the file."""
    done = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    for n, line in enumerate(data[:keep].splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(int(json.loads(line)["source_index"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {n}: not a regenerated record ({e}); use a new output file") from None
    return done


def _prompts(tokenizer, records, max_prompt_tokens: int, skipped: dict):
    """(source_index, user_text, prompt_ids) of records whose first user turn fits in ``max_prompt_tokens``
    (the first of identical user turns only)."""
    seen = set()
    for idx, rec in records:
        try:
            first = to_messages(rec)[0]  # to_messages starts every chat with the user's turn
            check_no_special_tokens(tokenizer, [first])  # the same rule as prepare_data's
        except SkipConversation as s:
            skipped[s.reason] = skipped.get(s.reason, 0) + 1
            continue
        text = first["content"]
        if not text.strip():
            skipped["empty_prompt"] = skipped.get("empty_prompt", 0) + 1
            continue
        if text in seen:  # ShareGPT repeats prompts such as "continue": one greedy answer each is enough
            skipped["duplicate_prompt"] = skipped.get("duplicate_prompt", 0) + 1
            continue
        seen.add(text)
        ids = tokenizer.apply_chat_template([first], add_generation_prompt=True, return_dict=True)["input_ids"]
        if len(ids) > max_prompt_tokens:
            skipped["prompt_too_long"] = skipped.get("prompt_too_long", 0) + 1
            continue
        yield idx, text, list(ids)


@torch.no_grad()
def _answer_batch(target, prompts, max_new_tokens: int, eos: list, pad_id: int):
    """Greedy answers (token lists without the end-of-turn token, finished flags) for a batch of prompt ids."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[b, width - len(p):] = torch.tensor(p)
        att[b, width - len(p):] = 1
    out = target.model.generate(input_ids=ids.to(target.device), attention_mask=att.to(target.device),
                                do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    answers = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append((row if stop is None else row[:stop], stop is not None))
    return answers


def regenerate(target, conversations, out_path: str, *, num_conversations: Optional[int] = None, start: int = 0,
               seed: Optional[int] = None, max_prompt_tokens: int = 512, max_new_tokens: int = 256,
               batch_size: int = 16, progress: bool = True, stop_after_batches: Optional[int] = None) -> dict:
    """Answer the first user turn of records ``[start, start + num_conversations)`` of ``conversations`` with the
    target's greedy decoding and append them to the JSON Lines file ``out_path``. Returns counts.

    target: a hass_ext.Target (or a name/path, None for the embedded model). conversations, start,
    num_conversations, seed: as for ``prepare_data``. Prompts longer than ``max_prompt_tokens`` (chat template
    included) and records without a usable user turn are skipped. Batches group prompts of similar length.
    """


    if max_new_tokens < 1 or batch_size < 1 or max_prompt_tokens < 1:
        raise ValueError(f"max_new_tokens, batch_size and max_prompt_tokens must be positive, got "
                         f"{max_new_tokens}, {batch_size}, {max_prompt_tokens}")
    target = resolve_target(target)
    tok = target.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"the tokenizer of {target.name} has no chat template")
    records, source = load_records(conversations, start=start, num=num_conversations, seed=seed)
    done = _read_done(out_path)
    skipped: dict = {}
    todo = [p for p in _prompts(tok, records, max_prompt_tokens, skipped) if p[0] not in done]
    todo.sort(key=lambda p: len(p[2]))  # similar lengths together: little padding
    eos = sorted(target.eos_token_ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    counts = {"answered": 0, "finished": 0, "answer_tokens": 0}
    bar = tqdm(total=len(todo), unit="conv", desc="regenerate", disable=not progress)
    try:
        with open(out_path, "a", encoding="utf-8") as f:
            for k in range(0, len(todo), batch_size):
                if stop_after_batches is not None and k // batch_size >= stop_after_batches:
                    break
                batch = todo[k:k + batch_size]
                answers = _answer_batch(target, [p[2] for p in batch], max_new_tokens, eos, pad_id)
                for (idx, text, _), (ans, finished) in zip(batch, answers):
                    value = tok.decode(ans, skip_special_tokens=True).strip()
                    f.write(json.dumps({"source_index": idx, "finished": finished, "conversations": [
                        {"from": "human", "value": text}, {"from": "gpt", "value": value}]}, ensure_ascii=False)
                            + "\n")
                    counts["answered"] += 1
                    counts["finished"] += int(finished)
                    counts["answer_tokens"] += len(ans)
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
    finally:
        bar.close()
    return {**counts, "already_done": len(done), "skipped": skipped, "selected": len(records),
            "source": source.get("name")}
