"""Bad input to the API and the CLI: one-line errors naming what was wrong, raised before anything is loaded."""
import os
import subprocess
import sys

import pytest
import torch

import hass_ext
from hass_ext import cli
from tiny_models import tiny_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temprature=0.5), r"unknown argument\(s\) \['temprature'\]"),
    (dict(temperature=True), "temperature must be a finite number >= 0"),
    (dict(temperature=1e-40), r"temperature must be 0 \(greedy\) or at least 1e-06, got 1e-40"),
    (dict(recalibrate=True), "need a draft"),
])
def test_bad_generation_arguments(target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hass_ext.generate([1, 2, 3], target=target, **kwargs)


@pytest.mark.parametrize("prompt, match", [
    ([{"role": "user", "content": None}], "chat message 0 content must be a string, got NoneType"),
    ([{"role": "user", "content": 7}], "chat message 0 content must be a string, got int"),
    ([{"role": "wizard", "content": "hi"}], "chat message 0 has role 'wizard'; the roles are system, user"),
    (torch.tensor([1.0, 2.0]), "integer tensor, got dtype torch.float32"),
    ([1.0, 2.0], "prompt must be"),
    ([True, 2], "prompt must be"),
])
def test_bad_prompts(target, prompt, match):
    with pytest.raises(ValueError, match=match):
        target.encode(prompt)


def test_small_given_tree_lowers_the_default_topk(target):
    draft = hass_ext.init_draft(target, seed=0)
    r = hass_ext.generate([1, 2, 3], target=target, draft=draft, max_new_tokens=4, total_tokens=1)
    assert r.tree.options() == {"total_tokens": 1, "depth": 6, "tree_topk": 1}
    with pytest.raises(ValueError, match=r"tree_topk \(10\) must be <= total_tokens \(1\)"):  # one they gave
        hass_ext.generate([1, 2, 3], target=target, draft=draft, total_tokens=1, tree_topk=10)


@pytest.mark.parametrize("device, match", [
    ("tpu", "device must be 'cpu' or 'cuda'"),
    ("nonsense", "device must be 'cpu' or 'cuda'"),
])
def test_bad_devices(device, match):
    with pytest.raises(ValueError, match=match):
        hass_ext.load_target(device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line():
    with pytest.raises(ValueError, match="device 'cuda': (this torch .* is a CPU-only build|no CUDA device)"):
        hass_ext.load_target(device="cuda")


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a CLI command gets as far as loading a model."""
    import hass_ext.target

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hass_ext.target, "load_target", refuse)


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an int > 0"),
    (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--temperature", "1e-40"], "temperature must be 0 (greedy) or at least 1e-06"),
    (["generate", "hi", "--total-tokens", "8"], "need --draft"),
    (["chat", "--depth", "3"], "need --draft"),
    (["generate", "hi", "--draft", "default", "--total-tokens", "4", "--tree-topk", "10"],
     "tree_topk (10) must be <= total_tokens (4)"),
    (["generate", "hi", "--device", "tpu"], "device must be 'cpu' or 'cuda'"),
    (["tree-profile", "--draft", "x", "--num-prompts", "0"], "--num-prompts must be > 0"),
    (["eval", "--temperatures", "-1"], "temperature must be a finite number >= 0"),
])
def test_cli_checks_arguments_before_loading(argv, message, nothing_loads, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hass-ext {argv[0]}: error: ") and message in err and err.count("\n") == 1


def test_tree_profile_default_start_is_inside_the_packaged_data_and_empty_range_is_explained(capsys,
                                                                                             nothing_loads):
    from hass_ext.train.conversations import first_user_turns

    assert len(first_user_turns("sharegpt", cli.TREE_PROFILE_START, 12)) == 12
    assert cli.main(["tree-profile", "--draft", "x", "--start", "10000000"]) == 2
    err = capsys.readouterr().err
    assert "no calibration prompts in 'sharegpt' from --start 10000000" in err and "smaller --start" in err


def test_ctrl_c_ends_the_reply_not_the_chat(monkeypatch, capsys):
    """Ctrl-C while a reply streams stops that reply; the next line is answered as usual."""
    gen = sys.modules["hass_ext.generate"]  # the module (hass_ext.generate is also the function)
    replies = []

    def fake_stream(messages, **kw):
        replies.append([dict(m) for m in messages])
        yield "partial"
        if len(replies) == 1:
            raise KeyboardInterrupt
        yield " answer"
        return gen.GenerationResult(text="partial answer", token_ids=[1, 2], prompt_tokens=3, elapsed=0.1)

    lines = iter(["first question", "second question", ""])
    monkeypatch.setattr(cli, "stream", fake_stream)
    monkeypatch.setattr(cli, "_load", lambda args: type("T", (), {"name": "fake"})())
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat"]) == 0
    out, err = capsys.readouterr()
    assert len(replies) == 2 and "[reply interrupted]" in err and "partial answer" in out
    assert replies[1][:2] == [{"role": "user", "content": "first question"},
                              {"role": "assistant", "content": "partial"}]


def test_stats_reports_the_calibration(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HASS_EXT_CACHE", str(tmp_path))
    tgt = tiny_target("llama", seed=2)
    draft = hass_ext.init_draft(tgt, seed=0)
    r = hass_ext.generate([1, 2, 3], target=tgt, draft=draft, max_new_tokens=6)
    cli._stats([1, 2, 3], dict(target=tgt, draft=draft, max_new_tokens=6), r)
    err = capsys.readouterr().err
    assert r.calibration is not None and r.calibration.path.startswith(str(tmp_path))
    assert f"calibration: round costs measured in" in err and "not counted in tokens/s" in err
    r = hass_ext.generate([1, 2, 3], target=tgt, draft=draft, max_new_tokens=6, recalibrate=True)
    assert r.calibration.source == "measured"


def test_help_is_quick_and_imports_no_torch():
    """hass-ext --help (the console script hass_ext_cli:main) neither imports torch nor takes long."""
    code = ("import sys, time; t = time.perf_counter(); import hass_ext_cli\n"
            "try:\n    hass_ext_cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'hass_ext' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    seconds, torch_loaded, package_loaded = proc.stderr.split()
    assert (torch_loaded, package_loaded) == ("False", "False")
    assert float(seconds) < 3.0  # well under 1 s on an idle machine; loose for a busy one
    assert "generate" in proc.stdout and "token-map" in proc.stdout


def test_quick_help_is_the_full_parsers_help(capsys):
    import hass_ext_cli

    full = cli.build_parser().format_help()
    assert hass_ext_cli.overview_parser().format_help() == full
    assert hass_ext_cli.main(["generate", "hi", "--max-new-tokens", "0"]) == 2  # commands go to hass_ext.cli
    assert "max_new_tokens must be an int > 0" in capsys.readouterr().err


def test_api_checks_tree_options_before_loading(nothing_loads):
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        hass_ext.generate("hi", target="some-org/some-model", draft="default", depth=0)
    with pytest.raises(ValueError, match="total_tokens must be an int >= 1 or 'auto', got 'big'"):
        hass_ext.generate("hi", target="some-org/some-model", draft="default", total_tokens="big")
