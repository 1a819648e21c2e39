"""Targets named by hub id load through transformers from the Hugging Face cache (offline honoured)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import hass_ext

t = hass_ext.load_target("tiny-org/tiny-llama")
r = hass_ext.generate([1, 2, 3], target=t, max_new_tokens=4)
out = {"name": t.name, "layers": t.config.num_hidden_layers, "tokens": len(r.token_ids)}
try:
    hass_ext.load_target("tiny-org/not-cached")
except FileNotFoundError as e:
    out["missing"] = str(e)
try:
    hass_ext.load_target("./no/such/folder")
except FileNotFoundError as e:
    out["folder"] = str(e)
print(json.dumps(out))
"""


def _fake_hub_cache(cache, repo="tiny-org/tiny-llama"):
    """A tiny model and tokenizer saved with save_pretrained, laid out as the hub cache stores a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import tiny_target

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(folder, "snapshots", commit)
    os.makedirs(os.path.join(folder, "refs"))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    tiny_target("llama", seed=0).model.save_pretrained(snapshot)
    vocab = {f"w{i}": i for i in range(32)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(snapshot)


def test_hub_id_loads_from_the_offline_cache_and_a_missing_one_is_one_line(tmp_path):
    cache = str(tmp_path / "hub")
    _fake_hub_cache(cache)
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ROOT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "tiny-org/tiny-llama" and out["layers"] == 2 and out["tokens"] == 4
    missing = out["missing"]
    assert "\n" not in missing and "'tiny-org/not-cached' is neither a local model folder nor a model found in " \
        "the Hugging Face cache (HF_HUB_OFFLINE is set" in missing
    assert out["folder"] == "target model folder not found: ./no/such/folder"
