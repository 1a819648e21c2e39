"""Vanilla generate(): equal to transformers' own greedy decoding, sampling reproducibility, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import hass_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_DIR = os.path.join(ROOT, "hass_ext", "data", "eval")  # MT-bench, HumanEval, GSM8K (80 questions each)


def eval_prompts(per_file):
    """First turns of the first ``per_file`` questions of each packaged eval file."""
    prompts = []
    for name in ("mt_bench", "humaneval", "gsm8k"):
        with open(os.path.join(EVAL_DIR, f"{name}.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        prompts += [r["turns"][0] for r in rows[:per_file]]
    return prompts


@pytest.fixture(scope="module")
def target():
    return hass_ext.load_target()


def test_greedy_equals_transformers_generate(target):
    prompts = eval_prompts(4)[:10]
    assert len(prompts) == 10
    for prompt in prompts:
        ids = target.encode(prompt)
        ours = hass_ext.generate(prompt, target=target, max_new_tokens=24)
        with torch.inference_mode():
            ref = target.model.generate(ids, max_new_tokens=24, do_sample=False, temperature=None, top_p=None,
                                        top_k=None, eos_token_id=sorted(target.eos_token_ids),
                                        pad_token_id=target.tokenizer.pad_token_id or 0)
        ref_new = ref[0, ids.shape[1]:].tolist()
        assert ours.token_ids == ref_new, prompt
        assert ours.num_new_tokens == len(ref_new)
        assert ours.text == target.tokenizer.decode(ref_new, skip_special_tokens=True)
        assert ours.tokens_per_second > 0 and ours.num_rounds == 0


def test_chat_messages_and_stream(target):
    messages = [{"role": "user", "content": "Name a colour."}]
    res = hass_ext.generate(messages, target=target, max_new_tokens=12)
    assert res.token_ids == hass_ext.generate("Name a colour.", target=target, max_new_tokens=12).token_ids
    pieces = []
    gen = hass_ext.stream(messages, target=target, max_new_tokens=12)
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            streamed = stop.value
            break
    assert "".join(pieces) == res.text == streamed.text


def test_sampling_is_seeded(target):
    a = hass_ext.generate("Tell me a story.", target=target, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    b = hass_ext.generate("Tell me a story.", target=target, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    c = hass_ext.generate("Tell me a story.", target=target, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stops_on_max_new_tokens_and_eos(target):
    res = hass_ext.generate("Count from one to one hundred.", target=target, max_new_tokens=5)
    assert res.num_new_tokens == 5 and res.stop_reason == "length"
    res = hass_ext.generate("Say only the word yes.", target=target, max_new_tokens=64)
    assert res.stop_reason == "eos" and res.token_ids[-1] in target.eos_token_ids


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt=[]), "empty list"),
    (dict(prompt=[{"content": "hi"}]), "role"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(total_tokens=8), "need a draft"),
])
def test_bad_input(target, kwargs, match):
    prompt = kwargs.pop("prompt", "hello")
    with pytest.raises(ValueError, match=match):
        hass_ext.generate(prompt, target=target, **kwargs)


def test_prompt_longer_than_context(target):
    ids = [1] * (target.max_length + 5)
    with pytest.raises(ValueError, match="accepts at most"):
        hass_ext.generate(ids, target=target, max_new_tokens=4)


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        hass_ext.load_target(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hass_ext.load_target(str(tmp_path))


def test_bad_small_batch_linear_is_refused_before_loading():
    with pytest.raises(ValueError, match="small_batch_linear must be True, False, 'tensor_cores' or None"):
        hass_ext.load_target(small_batch_linear="yes")


def test_cpu_default_attention_falls_back_for_models_without_it(monkeypatch):
    # A model class that rejects attn_implementation="hass_tree" still loads with the default attention; an
    # implementation the caller asked for is never swapped silently.
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained.__func__
    asked = []

    def picky(cls, path, **kw):
        asked.append(kw.get("attn_implementation"))
        if kw.get("attn_implementation") == "hass_tree":
            raise ValueError("this model does not support attn_implementation='hass_tree'")
        return real(cls, path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(picky))
    t = hass_ext.load_target(device="cpu")
    assert asked == ["hass_tree", None] and t.model.config._attn_implementation != "hass_tree"
    with pytest.raises(ValueError, match="hass_tree"):
        hass_ext.load_target(device="cpu", attn_implementation="hass_tree")


def test_default_attention_is_hass_tree_where_its_kernel_runs(monkeypatch):
    # The CPU always; a CUDA device only with hass_ext's CUDA kernels and a head dim they are built for (the
    # SmolLM2 target's 64 and Llama-3-8B's 128 yes, 96 no: that model loads with sdpa instead).
    from types import SimpleNamespace

    from hass_ext import target as target_mod

    cuda = torch.device("cuda")
    cfg = lambda d: SimpleNamespace(hidden_size=d * 8, num_attention_heads=8)  # noqa: E731
    assert target_mod.tree_attention_runs_on(torch.device("cpu"), cfg(96))
    monkeypatch.setattr(target_mod, "available_devices", lambda: ["cpu"])
    assert not target_mod.tree_attention_runs_on(cuda) and not target_mod.tree_attention_runs_on(cuda, cfg(128))
    monkeypatch.setattr(target_mod, "available_devices", lambda: ["cpu", "cuda"])
    assert target_mod.tree_attention_runs_on(cuda)
    assert [target_mod.tree_attention_runs_on(cuda, cfg(d)) for d in (64, 96, 128)] == [True, False, True]
    assert target_mod.tree_attention_runs_on(cuda, SimpleNamespace(head_dim=128, hidden_size=3072,
                                                                   num_attention_heads=32))


def test_cached_default_target_loads_fast(target):
    import time

    start = time.perf_counter()
    again = hass_ext.load_target()
    assert time.perf_counter() - start < 5.0  # typically ~0.3 s; generous for a loaded CI machine
    assert again.config.num_hidden_layers == 30 and again.config.vocab_size == 49152
    ids = again.encode("Hi")
    pre = again.prefill(ids, all_logits=True)
    assert pre.logits.shape == (1, ids.shape[1], 49152)
    assert pre.hidden_states.shape == (1, ids.shape[1], 576)
    # features are the final-norm hidden states: the lm_head of them gives the logits (up to summation order:
    # prefill runs under no_grad, where the CPU target's small calls take hass_ext.ops.small_linear)
    torch.testing.assert_close(again.model.lm_head(pre.hidden_states), pre.logits, rtol=1e-5, atol=1e-4)


def test_build_cuda_forced_with_cpu_torch_fails_clearly():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    env = dict(os.environ, HASS_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "HASS_BUILD_CUDA=1" in proc.stderr and "CPU-only build" in proc.stderr
    env["HASS_BUILD_CUDA"] = "maybe"
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "auto, 0 or 1" in proc.stderr


def test_cli_generate_streams_and_reports_speed(capsys):
    from hass_ext.cli import main

    assert main(["generate", "What is 2 + 2?", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "tokens/s" in err and " tokens in " in err
    assert main(["generate", "hi", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be an int > 0" in capsys.readouterr().err


def test_cli_help_reads_well(capsys):
    from hass_ext.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("generate", "chat", "eval", "tree-profile", "prepare-data", "train", "token-map"):
        assert command in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--draft" in text and "--total-tokens" in text and "--stats" in text


@pytest.mark.slow
def test_first_run_conversion_shows_progress(tmp_path):
    """The one-time conversion of the embedded model (about a minute) announces itself with a progress bar."""
    env = dict(os.environ, HASS_EXT_CACHE=str(tmp_path), PYTHONPATH=ROOT)
    code = "import hass_ext; t = hass_ext.load_target(); print(t.config.num_hidden_layers)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "30"
    assert "first run, converting SmolLM2-135M-Instruct" in proc.stderr and "4/4" in proc.stderr
    assert os.path.isfile(tmp_path / "smollm2-135m-instruct" / "model.safetensors")
