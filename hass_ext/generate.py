"""hass_ext.generate: vanilla or speculative decoding behind one call, with a streaming form.

The target, the draft and the tree shape are resolved here, once, and handed to a decoder of
hass_ext.speculative as plain values. A decoder is a generator that yields ``(tokens, accepted)`` chunks: the new
token ids it committed, and for a speculative verification round the number of accepted draft tokens (None for
tokens that did not come from a round, e.g. the first token after prefill or a vanilla step). The driver here
stops on EOS or max_new_tokens, times the run and collects the statistics.
"""
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from .batch import batched_speculative_decode, batched_vanilla_decode
from .draft_io import resolve_draft
from .sampling import check_sampling_args
from .speculative import (TREE_ATTENTION, Sampling, _attention_impl, decode_step,  # noqa: F401  (public)
                          speculative_decode, vanilla_decode)
from .static_rounds import static_speculative_decode, static_vanilla_decode
from .target import resolve_target
from .tree_choice import TREE_OPTIONS, given_tree, resolve_tree


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]               # the new tokens (EOS included when generation stopped on it)
    prompt_tokens: int
    elapsed: float                     # seconds, prefill included
    accept_lengths: List[int] = field(default_factory=list)  # accepted draft tokens per verification round
    stop_reason: str = "length"        # "eos" or "length"
    tree: Optional[object] = None      # the tree_choice.TreeChoice used (None for vanilla decoding)
    setup_seconds: float = 0.0         # resolving target, draft and tree (a first calibration included), untimed

    @property
    def calibration(self):
        """Where the round costs behind an automatic tree came from (hass_ext.calibration.Calibration), or None."""
        return getattr(self.tree, "calibration", None)

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


def _make_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def check_generation_args(max_new_tokens, temperature, top_p, top_k, draft, tree_options) -> None:
    """ValueError naming the first bad argument, before anything is loaded."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_p, top_k)  # the one rule for sampling arguments
    unknown = sorted(set(tree_options) - set(TREE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; generate takes target, draft, max_new_tokens, "
                         f"temperature, top_p, top_k, seed, chat and, with a draft, the tree options "
                         f"{', '.join(TREE_OPTIONS)}")
    if draft is None and tree_options:
        raise ValueError(f"tree options {sorted(tree_options)} need a draft (draft=None is vanilla decoding)")
    given_tree(**tree_options)  # the option values, before the target is loaded


def _check_cuda_graphs(cuda_graphs) -> None:
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True, False or None (True on CUDA), got {cuda_graphs!r}")


def _generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p, top_k, seed, chat,
                tree_options, cuda_graphs=None):
    """Generator behind generate/stream: yields (target, tokens so far) after each chunk, returns the result."""
    check_generation_args(max_new_tokens, temperature, top_p, top_k, draft, tree_options)
    _check_cuda_graphs(cuda_graphs)
    setup = time.perf_counter()
    target = resolve_target(target)
    if cuda_graphs and target.device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA target; {target.name} is on {target.device}")
    if cuda_graphs is None:  # where the fixed-shape steps keep the eager bits: the row-invariant attention
        cuda_graphs = target.device.type == "cuda" and _attention_impl(target) == TREE_ATTENTION
    input_ids = target.encode(prompt_or_messages, chat=chat)
    if input_ids.shape[1] >= target.max_length:
        raise ValueError(f"prompt has {input_ids.shape[1]} tokens; {target.name} accepts at most "
                         f"{target.max_length} tokens including the generation")
    max_new_tokens = min(max_new_tokens, target.max_length - input_ids.shape[1])
    generator = _make_generator(seed, target.device)
    sampling = (temperature, top_p, top_k, generator)
    tree = None
    if draft is not None:
        draft = resolve_draft(draft, target)
        # the tree choice (its round costs measured once per machine) is set-up, not generation: timed apart
        tree = resolve_tree(target, draft, **tree_options)
    if tree is None or tree.vanilla_is_faster:  # (an automatic tree slower than vanilla: the same output, sooner)
        if cuda_graphs:  # fixed-shape steps, captured once and replayed (hass_ext.static_rounds)
            decoder = static_vanilla_decode(target, input_ids, max_new_tokens, *sampling, cuda_graphs=True)
        else:
            decoder = vanilla_decode(target, input_ids, max_new_tokens, *sampling)
    elif cuda_graphs:  # fixed-shape rounds, captured once and replayed
        decoder = static_speculative_decode(target, draft, input_ids, max_new_tokens, *sampling, **tree.options(),
                                            cuda_graphs=True)
    else:
        decoder = speculative_decode(target, draft, input_ids, max_new_tokens, *sampling, **tree.options())
    setup = time.perf_counter() - setup
    eos = target.eos_token_ids
    tokens, accepts, stop = [], [], "length"
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
                            accept_lengths=accepts, stop_reason=stop, tree=tree, setup_seconds=setup)


# ---- batches ----------------------------------------------------------------------------------------------

def is_batch(prompts) -> bool:
    """Whether ``prompts`` is a list of prompts rather than one prompt. One prompt is a string, token ids (a
    tensor or a list of ints) or one conversation (a list of message dicts); any other list or tuple is a batch,
    whose rows are then checked one by one (an empty list is an empty batch, refused there)."""
    if not isinstance(prompts, (list, tuple)):
        return False
    one = bool(prompts) and (all(isinstance(p, dict) for p in prompts)
                             or all(isinstance(p, int) and not isinstance(p, bool) for p in prompts))
    return not one


def _check_batch(prompts, max_new_tokens, seed, batch_size) -> tuple:
    """ValueError naming the first bad row or per-row option; returns (max_new per row, seed per row)."""
    if not prompts:
        raise ValueError("prompts is an empty list: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list, tuple, torch.Tensor)):
            raise ValueError(f"prompts[{i}] must be a string, a list of chat messages or token ids, got "
                             f"{type(p).__name__} {p!r:.60}")
    B = len(prompts)

    def per_row(name, value, check):
        if isinstance(value, (list, tuple)):
            if len(value) != B:
                raise ValueError(f"{name} has {len(value)} entries; give one per prompt ({B}) or one value")
            for i, v in enumerate(value):
                check(f"{name}[{i}]", v)
            return list(value)
        check(name, value)
        return [value] * B

    def check_max_new(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be an int > 0, got {v!r}")

    def check_seed(name, v):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{name} must be an int or None, got {v!r}")

    max_new = per_row("max_new_tokens", max_new_tokens, check_max_new)
    seeds = per_row("seed", seed, check_seed)
    if not isinstance(seed, (list, tuple)) and seed is not None:
        seeds = [seed + i for i in range(B)]  # one seed for the batch: row i draws from seed + i
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None (all prompts in one batch), got {batch_size!r}")
    return max_new, seeds


def encode_prompts(target, prompts, chat, names) -> list:
    """Each prompt's token ids ``[1, L]`` (``Target.encode``), every one checked before anything is decoded; a
    ValueError names the bad one by ``names[i]``."""
    ids = []
    for name, p in zip(names, prompts):
        try:
            row = target.encode(p, chat=chat)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if row.shape[1] >= target.max_length:
            raise ValueError(f"{name} has {row.shape[1]} tokens; {target.name} accepts at most "
                             f"{target.max_length} tokens including the generation")
        ids.append(row)
    return ids


def _batch_generation(prompts, target, draft, max_new_tokens, temperature, top_p, top_k, seed, chat,
                      tree_options, batch_size):
    """Generator behind generate/stream for a list of prompts: yields (target, row, tokens of the row so far)
    after each event and returns one GenerationResult per prompt. Prompts go in batches of ``batch_size`` (all at
    once by default); each batch runs until its last row is done."""
    max_new, seeds = _check_batch(prompts, max_new_tokens, seed, batch_size)
    check_generation_args(max(max_new), temperature, top_p, top_k, draft, tree_options)
    setup = time.perf_counter()
    target = resolve_target(target)
    ids = encode_prompts(target, prompts, chat, [f"prompts[{i}]" for i in range(len(prompts))])
    max_new = [min(m, target.max_length - r.shape[1]) for m, r in zip(max_new, ids)]
    if draft is not None:
        draft = resolve_draft(draft, target)
    size = batch_size or len(prompts)
    trees = {}
    setup = time.perf_counter() - setup
    results = [None] * len(prompts)
    sampling = Sampling(temperature, top_p, top_k, None)
    for lo in range(0, len(prompts), size):
        rows = range(lo, min(lo + size, len(prompts)))
        generators = [_make_generator(seeds[i], target.device) for i in rows]
        tree = None
        if draft is not None:
            B = len(rows)
            if B not in trees:
                t0 = time.perf_counter()
                trees[B] = resolve_tree(target, draft, batch=B, **tree_options)
                setup += time.perf_counter() - t0
            tree = trees[B]
        if tree is None or tree.vanilla_is_faster:  # (an automatic tree slower than vanilla: the same output)
            decoder = batched_vanilla_decode(target, [ids[i] for i in rows], [max_new[i] for i in rows], sampling,
                                             generators, target.eos_token_ids)
        else:
            decoder = batched_speculative_decode(target, draft, [ids[i] for i in rows], [max_new[i] for i in rows],
                                                 sampling, generators, target.eos_token_ids, **tree.options())
        tokens = {i: [] for i in rows}
        accepts = {i: [] for i in rows}
        start = time.perf_counter()
        try:
            for ev in decoder:
                i = lo + ev.row
                tokens[i] += ev.tokens
                if ev.accepted is not None:
                    accepts[i].append(ev.accepted)
                yield target, i, tokens[i]
                if ev.stop is not None:
                    results[i] = GenerationResult(
                        text=target.tokenizer.decode(tokens[i], skip_special_tokens=True), token_ids=tokens[i],
                        prompt_tokens=int(ids[i].shape[1]), elapsed=time.perf_counter() - start,
                        accept_lengths=accepts[i], stop_reason=ev.stop, tree=tree, setup_seconds=setup)
        finally:
            decoder.close()
    return results


def _check_batch_graphs(cuda_graphs) -> None:
    _check_cuda_graphs(cuda_graphs)
    if cuda_graphs:
        raise ValueError("cuda_graphs=True applies to one prompt: a batch (a list of prompts) decodes with eager "
                         "rounds (leave cuda_graphs unset)")


def _drive(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def generate(prompt_or_messages, *, target=None, draft=None, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, chat: Optional[bool] = None,
             batch_size: Optional[int] = None, cuda_graphs: Optional[bool] = None, **tree_options):
    """Generate a continuation of a prompt, or of each prompt of a list.

    prompt_or_messages: a string (wrapped as a user turn of the chat template when the tokenizer has one,
        unless ``chat=False``), a list of chat messages, or token ids. A list of such prompts is decoded as a
        batch and gives a list of results, one per prompt, in order: greedy rows are token-identical to the
        prompt decoded alone, sampled rows draw from their own generator (the same prompts, options and seeds give
        the same texts; a row's exact sample also depends on the tree depth, which near the end follows the
        batch's longest remaining row), and rows that end leave the batch. ``max_new_tokens`` and ``seed`` may then be lists (one value per prompt); one int seed
        gives row i the seed ``seed + i``. ``batch_size``: at most that many rows per batch (default: all).
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
        top-k 10 (the EAGLE-2 tree: 60 / 6 / 10) unless given (top-k lowered to fit a smaller tree).
        The round costs behind ``"auto"`` are measured once per machine and cached on disk
        (hass_ext.calibration); ``recalibrate=True`` (or ``HASS_EXT_RECALIBRATE=1``) measures them again.
        ``result.calibration`` says whether they were measured or read, and ``result.setup_seconds`` how long
        the set-up took (not part of ``elapsed``). When the measured costs say no profiled shape beats a vanilla
        step here (``result.tree.vanilla_is_faster``: e.g. a large batch on a CPU), the automatic tree decodes
        without the draft, with a warning: the output is the same, sooner.
    cuda_graphs (one prompt): decode with fixed-shape rounds (vanilla: fixed-shape steps) captured once in a CUDA
        graph and replayed (hass_ext.static_rounds): one launch and one host read per round or step, the tokens
        of the eager loop. The default None means True on a CUDA target whose attention is hass_tree
        (load_target's choice where the kernel runs), False elsewhere; True on a CPU target is an error. The first
        round runs eagerly and the second is captured: a one-off set-up of about one round plus the capture.
        A round that cannot be captured (e.g. a custom target layer that reads a value back) falls back to eager
        rounds with a warning. Batches (a list of prompts) decode eagerly.
    """
    if is_batch(prompt_or_messages):
        _check_batch_graphs(cuda_graphs)
        return _drive(_batch_generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p,
                                        top_k, seed, chat, tree_options, batch_size))
    if batch_size is not None:
        raise ValueError("batch_size applies to a list of prompts; one prompt was given")
    return _drive(_generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p, top_k, seed,
                              chat, tree_options, cuda_graphs))


def stream(prompt_or_messages, *, target=None, draft=None, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, chat: Optional[bool] = None,
           batch_size: Optional[int] = None, cuda_graphs: Optional[bool] = None, **tree_options) -> Iterator:
    """``generate`` that yields the text as it is produced; the generator returns the GenerationResult
    (``StopIteration.value``, or ``result = yield from stream(...)``). For a list of prompts it yields
    ``(row, piece)`` pairs (row: the prompt's index) and returns the list of results."""
    if is_batch(prompt_or_messages):
        _check_batch_graphs(cuda_graphs)
        gen = _batch_generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p, top_k,
                                seed, chat, tree_options, batch_size)
        return (yield from _pieces(gen, batched=True))
    if batch_size is not None:
        raise ValueError("batch_size applies to a list of prompts; one prompt was given")
    gen = _generation(prompt_or_messages, target, draft, max_new_tokens, temperature, top_p, top_k, seed, chat,
                      tree_options, cuda_graphs)
    return (yield from _pieces(_as_row_events(gen), batched=False))


def _as_row_events(gen):
    """``_generation``'s (target, tokens) updates as (target, 0, tokens); returns its result."""
    while True:
        try:
            tgt, tokens = next(gen)
        except StopIteration as stop:
            return stop.value
        yield tgt, 0, tokens


def _pieces(gen, batched: bool):
    """Text pieces of each row as its tokens come (a partial UTF-8 character held back), then the rest of each
    row's final text; returns the generator's result(s)."""
    shown = {}
    while True:
        try:
            tgt, row, tokens = next(gen)
        except StopIteration as stop:
            results = stop.value
            break
        text = tgt.tokenizer.decode(tokens, skip_special_tokens=True)
        old = shown.get(row, "")
        if len(text) > len(old) and not text.endswith("\ufffd"):
            yield (row, text[len(old):]) if batched else text[len(old):]
            shown[row] = text
    for row, result in enumerate(results if batched else [results]):
        old = shown.get(row, "")
        if len(result.text) > len(old) and result.text.startswith(old):
            yield (row, result.text[len(old):]) if batched else result.text[len(old):]
    return results
