"""hass_ext.generate: vanilla or speculative decoding behind one call, with a streaming form.

A decoder is a generator that yields ``(tokens, accepted)`` chunks: the new token ids it committed, and for a
speculative verification round the number of accepted draft tokens (None for tokens that did not come from a
round, e.g. the first token after prefill or a vanilla step). The driver here stops on EOS or
max_new_tokens, times the run and collects the statistics.
"""
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from .sampling import check_sampling_args, sample_token


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]               # the new tokens (EOS included when generation stopped on it)
    prompt_tokens: int
    elapsed: float                     # seconds, prefill included
    accept_lengths: List[int] = field(default_factory=list)  # accepted draft tokens per verification round
    stop_reason: str = "length"        # "eos" or "length"
    tree: Optional[object] = None      # the tree_choice.TreeChoice used (None for vanilla decoding)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.elapsed if self.elapsed > 0 else float("inf")

    @property
    def num_rounds(self) -> int:
        """Target verification forwards (0 for vanilla decoding)."""
        return len(self.accept_lengths)

    @property
    def mean_accept_length(self) -> float:
        """tau: new tokens per target verification forward (the first token, from prefill, is not counted)."""
        if not self.accept_lengths:
            return 1.0
        return sum(a + 1 for a in self.accept_lengths) / len(self.accept_lengths)


def vanilla_decode(target, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                   top_k: int, generator: Optional[torch.Generator]) -> Iterator[tuple]:
    """Autoregressive decoding with a KV cache: the baseline every speedup is measured against."""
    pre = target.prefill(input_ids)
    cache, logits = pre.past_key_values, pre.logits[:, -1]
    for _ in range(max_new_tokens):
        token = sample_token(logits, temperature, top_p, top_k, generator)
        yield [int(token)], None
        logits = decode_step(target, token, cache)


@torch.no_grad()
def decode_step(target, token: torch.Tensor, cache) -> torch.Tensor:
    """One vanilla step: the target over one token, appending to its KV cache; the next logits ``[1, V]``."""
    return target.model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]


def _resolve_target(target):
    from .target import Target, load_target

    if target is None:
        return _default_target()
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return load_target(target)
    raise ValueError(f"target must be None, a model name/path or a hass_ext.Target, got {type(target).__name__}")


_DEFAULT = {}


def _default_target():
    from .target import load_target

    if "target" not in _DEFAULT:
        _DEFAULT["target"] = load_target()
    return _DEFAULT["target"]


def _make_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def _decoder(target, draft, input_ids, max_new_tokens, temperature, top_p, top_k, generator, tree_options):
    """The decoder generator and the tree it uses (None for vanilla decoding)."""
    if draft is None:
        if tree_options:
            raise ValueError(f"tree options {sorted(tree_options)} need a draft (draft=None is vanilla decoding)")
        return vanilla_decode(target, input_ids, max_new_tokens, temperature, top_p, top_k, generator), None
    from .speculative import resolve_draft, resolve_tree, speculative_decode

    unknown = sorted(set(tree_options) - {"total_tokens", "depth", "tree_topk"})
    if unknown:
        raise ValueError(f"unknown tree options {unknown}; the options are total_tokens, depth, tree_topk")
    draft = resolve_draft(draft, target)
    tree = resolve_tree(target, draft, **tree_options)
    return speculative_decode(target, draft, input_ids, max_new_tokens, temperature, top_p, top_k, generator,
                              **tree.options()), tree


def _generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p, top_k, seed, chat,
                tree_options):
    """Generator behind generate/stream: yields (target, tokens so far) after each chunk, returns the result."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_p, top_k)
    target = _resolve_target(target)
    input_ids = target.encode(prompt_or_messages, chat=chat)
    if input_ids.shape[1] >= target.max_length:
        raise ValueError(f"prompt has {input_ids.shape[1]} tokens; {target.name} accepts at most "
                         f"{target.max_length} tokens including the generation")
    max_new_tokens = min(max_new_tokens, target.max_length - input_ids.shape[1])
    generator = _make_generator(seed, target.device)
    eos = target.eos_token_ids
    tokens, accepts, stop = [], [], "length"
    # the tree choice (measured once per process and device) is set-up, not generation: timed apart
    decoder, tree = _decoder(target, draft, input_ids, max_new_tokens, temperature, top_p, top_k, generator,
                             tree_options)
    start = time.perf_counter()
    try:
        for chunk, accepted in decoder:
            if accepted is not None:
                accepts.append(accepted)
            for t in chunk:
                tokens.append(t)
                if t in eos:
                    stop = "eos"
                    break
                if len(tokens) >= max_new_tokens:
                    break
            yield target, tokens
            if stop == "eos" or len(tokens) >= max_new_tokens:
                break
    finally:
        decoder.close()
    elapsed = time.perf_counter() - start
    text = target.tokenizer.decode(tokens, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=tokens, prompt_tokens=int(input_ids.shape[1]), elapsed=elapsed,
                            accept_lengths=accepts, stop_reason=stop, tree=tree)


def generate(prompt_or_messages, *, target=None, draft=None, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, chat: Optional[bool] = None,
             **tree_options) -> GenerationResult:
    """Generate a continuation of a prompt.

    prompt_or_messages: a string (wrapped as a user turn of the chat template when the tokenizer has one,
        unless ``chat=False``), a list of chat messages, or token ids.
    target: None for the embedded default (SmolLM2-135M-Instruct), a model name/path, or a ``Target``.
    draft: None for vanilla autoregressive decoding; otherwise speculative decoding with a draft: a
        ``hass_ext.DraftModel`` (on the target's device and dtype), an EAGLE/HASS checkpoint folder, or
        ``"default"`` (the draft packaged for the target). The output is unchanged: token-identical to vanilla
        when greedy, the same distribution when sampling.
    temperature: 0 for greedy decoding; otherwise sampling from the distribution of ``hass_ext.sampling``
        (temperature, then top_k, then top_p). seed: makes sampling reproducible.
    tree_options (speculative decoding only): ``total_tokens`` nodes of the EAGLE-2 draft tree, root included,
        ``depth`` draft levels = the most draft tokens a round can accept, ``tree_topk`` children kept per
        expanded node (at most ``total_tokens``). The default ``total_tokens="auto"`` chooses all three for this
        device: from the draft's acceptance profile (``tree_profile.json`` beside it) and the measured cost of a
        round here, or, for a draft without a profile, the size from the target's forward cost with depth 6 and
        top-k 10. ``result.tree`` says what was used. An int ``total_tokens`` is used as given, with depth 6 and
        top-k 10 (the EAGLE-2 tree: 60 / 6 / 10) unless given.
    """
    gen = _generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p, top_k, seed, chat,
                      tree_options)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def stream(prompt_or_messages, *, target=None, draft=None, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, chat: Optional[bool] = None,
           **tree_options) -> Iterator[str]:
    """``generate`` that yields the text as it is produced; the generator returns the GenerationResult
    (``StopIteration.value``, or ``result = yield from stream(...)``)."""
    gen = _generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p, top_k, seed, chat,
                      tree_options)
    shown = ""
    while True:
        try:
            tgt, tokens = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        text = tgt.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
            yield text[len(shown):]
            shown = text
    if len(result.text) > len(shown) and result.text.startswith(shown):
        yield result.text[len(shown):]
    return result
